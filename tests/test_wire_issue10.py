"""Issue 10: usage in less common places, calls that got no record, token counts, background
Responses, form request bodies, llama.cpp ``stop_type``, rounds only for chat-like operations,
provider markers. Fixtures follow the providers' documented wire shapes."""

from __future__ import annotations

import json

import pytest

from aistats_engine.observer import Parsed, StreamObserver, parse_body
from aistats_engine.wire.format import WireFormat
from aistats_engine.wire.formats import FORMATS, by_api, match_api
from aistats_engine.wire.framing import framer_for
from aistats_engine.wire.reader import read_request
from aistats_engine.wire.usage import Usage, gemini_usage


def sse(*events: dict | str, named: bool = False) -> bytes:
    out = []
    for e in events:
        data = e if isinstance(e, str) else json.dumps(e)
        head = f"event: {e['type']}\n" if named and isinstance(e, dict) else ""
        out.append(f"{head}data: {data}\n\n")
    return "".join(out).encode()


def stream(fmt, body: bytes, ctype: str = "text/event-stream", step: int | None = None):
    obs = StreamObserver(fmt, framer_for(ctype)(), None, 0.0)
    step = step or len(body) or 1
    for i in range(0, len(body), step):
        obs.feed(body[i:i + step], 0.01 * (i + 1))
    return obs.finish(True), obs.timing()


def whole(fmt, obj) -> Parsed:
    return parse_body(fmt, obj if isinstance(obj, bytes) else json.dumps(obj).encode(), None)


def usage_of(p: Parsed):
    u = p.usage
    return (u.input, u.output, u.cached, u.cache_creation, u.reasoning)


def fmt_of(method: str, path: str) -> WireFormat:
    m = match_api(method, path)
    assert m is not None, (method, path)
    return m.fmt


# -- the registry: every format reachable by its method and path ------------------------------

PATHS = {
    ("POST", "/v1/chat/completions"): "chat_completions",
    ("POST", "/v1/messages/count_tokens"): "count_tokens",
    ("POST", "/v1/messages"): "messages",
    ("POST", "/v1/responses/input_tokens"): "count_tokens",
    ("POST", "/v1/responses/compact"): "responses_compact",
    ("POST", "/v1/responses/resp_68af/cancel"): "responses_cancel",
    ("GET", "/v1/responses/resp_68af"): "responses_retrieve",
    ("POST", "/v1/responses"): "responses",
    ("POST", "/v1/embeddings"): "embeddings",
    ("POST", "/v1/rerank"): "rerank",
    ("POST", "/infill"): "infill",
    ("POST", "/api/chat"): "ollama_chat",
    ("POST", "/api/generate"): "ollama_generate",
    ("POST", "/api/embed"): "ollama_embed",
    ("POST", "/v1/completions"): "completions",
    ("POST", "/completion"): "completions",
    ("POST", "/v1beta/models/gemini-2.5-flash:streamGenerateContent"): "generate_content",
    ("POST", "/v1beta/models/gemini-2.5-flash:countTokens"): "count_tokens",
    ("POST", "/v1beta/models/gemini-embedding-001:embedContent"): "embed_content",
    ("POST", "/v1/projects/p/locations/us-central1/publishers/google/models/"
             "text-embedding-005:predict"): "predict",
    ("POST", "/model/anthropic.claude-3-5-sonnet/converse-stream"): "converse",
    ("POST", "/model/anthropic.claude-3-5-sonnet/invoke-with-response-stream"): "invoke",
    ("POST", "/model/anthropic.claude-3-5-sonnet-20240620-v1:0/count-tokens"): "count_tokens",
    ("POST", "/v2/chat"): "cohere_chat",
    ("POST", "/v2/embed"): "cohere_embed",
    ("POST", "/v1/audio/speech"): "audio_speech",
    ("POST", "/v1/audio/transcriptions"): "audio_transcriptions",
    ("POST", "/v1/audio/translations"): "audio_translations",
    ("POST", "/v1/images/generations"): "images_generations",
    ("POST", "/v1/images/edits"): "images_edits",
    ("POST", "/sdapi/v1/txt2img"): "sdapi_txt2img",
    ("POST", "/sdapi/v1/img2img"): "sdapi_img2img",
}


def test_every_registered_format_is_reachable_by_method_and_path():
    reached = {match_api(method, p).fmt for method, p in PATHS}
    assert reached == set(FORMATS)
    for (method, path), api in PATHS.items():
        assert match_api(method, path + "?alt=sse").api == api, path
    for fmt in FORMATS:
        assert isinstance(fmt, WireFormat) and fmt.api and fmt.operation, fmt
        assert fmt.methods


@pytest.mark.parametrize("method,path,api,operation,model", [
    ("POST", "/v2/chat", "cohere_chat", "chat", None),
    ("POST", "/v2/embed", "cohere_embed", "embeddings", None),
    ("POST", "/v1beta/models/text-embedding-004:batchEmbedContents", "embed_content",
     "embeddings", "text-embedding-004"),
    ("POST", "/v1/projects/p/locations/us-central1/publishers/google/models/"
             "gemini-embedding-001:embedContent", "embed_content", "embeddings",
     "gemini-embedding-001"),
    ("POST", "/v1/projects/p/locations/europe-west4/publishers/google/models/"
             "textembedding-gecko%40003:predict", "predict", "embeddings",
     "textembedding-gecko@003"),
    ("POST", "/v1/responses/compact", "responses_compact", "chat", None),
    ("POST", "/v1/responses/input_tokens", "count_tokens", "count_tokens", None),
    ("POST", "/model/us.anthropic.claude-sonnet-4-20250514-v1%3A0/count-tokens", "count_tokens",
     "count_tokens", "us.anthropic.claude-sonnet-4-20250514-v1:0"),
    ("POST", "/v1/audio/speech", "audio_speech", "text_to_speech", None),
    ("POST", "/upstream/whisper-large-v3/v1/audio/transcriptions", "audio_transcriptions",
     "speech_to_text", "whisper-large-v3"),
    ("POST", "/v1/audio/translations", "audio_translations", "speech_to_text", None),
    ("POST", "/v1/images/generations", "images_generations", "image_generation", None),
    ("POST", "/v1/images/edits", "images_edits", "image_generation", None),
    ("POST", "/upstream/flux/sdapi/v1/txt2img", "sdapi_txt2img", "image_generation", "flux"),
    ("POST", "/sdapi/v1/img2img", "sdapi_img2img", "image_generation", None),
    ("GET", "/v1/responses/resp_68af?stream=true&starting_after=5", "responses_retrieve", "chat",
     None),
    ("POST", "/v1/responses/resp_68af/cancel", "responses_cancel", "chat", None),
])
def test_new_paths(method, path, api, operation, model):
    m = match_api(method, path)
    assert (m.api, m.operation, m.model_from_path) == (api, operation, model)


def test_method_is_part_of_the_match():
    assert match_api("GET", "/v1/chat/completions") is None  # POST-only formats stay POST-only
    assert match_api("GET", "/v1/responses") is None
    assert match_api("POST", "/v1/responses/resp_68af") is None  # retrieving is a GET
    assert match_api("DELETE", "/v1/responses/resp_68af") is None
    assert match_api("GET", "/v1/responses/resp_68af/input_items") is None
    assert match_api("GET", "/forms/responses/42") is None  # not a Responses id
    assert match_api("get", "/v1/responses/resp_68af").api == "responses_retrieve"
    # Vertex predict on a model that is not an embedding model is not an embedding call.
    assert match_api("POST", "/v1/projects/p/locations/us-central1/publishers/google/models/"
                             "imagen-3.0-generate-002:predict") is None


# -- Gemini: thoughts without candidates, the last usageMetadata wins whole -------------------

GEMINI_THOUGHTS_ONLY = {
    "candidates": [{"content": {"role": "model"}, "finishReason": "MAX_TOKENS", "index": 0}],
    "usageMetadata": {"promptTokenCount": 12, "totalTokenCount": 111,
                      "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 12}],
                      "thoughtsTokenCount": 99},
    "modelVersion": "gemini-2.5-pro", "responseId": "mZqnaL3oJ8uSxN8P1aTiiAM",
}

GEMINI_LAST_DROPS_CANDIDATES = sse(
    {"candidates": [{"content": {"parts": [{"text": "The"}], "role": "model"}, "index": 0}],
     "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 1, "totalTokenCount": 39,
                       "cachedContentTokenCount": 4, "thoughtsTokenCount": 30},
     "modelVersion": "gemini-2.5-flash", "responseId": "r-77"},
    {"candidates": [{"content": {"parts": [{"text": " sky is blue because"}], "role": "model"},
                     "index": 0}],
     "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 12, "totalTokenCount": 50,
                       "thoughtsTokenCount": 30},
     "modelVersion": "gemini-2.5-flash", "responseId": "r-77"},
    {"candidates": [{"content": {"parts": [{"text": " of scattering."}], "role": "model"},
                     "finishReason": "STOP", "index": 0}],
     "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 52, "thoughtsTokenCount": 30,
                       "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 8}]},
     "modelVersion": "gemini-2.5-flash", "responseId": "r-77"},
)


def test_gemini_thoughts_only_body():
    p = whole("generate_content", GEMINI_THOUGHTS_ONLY)
    assert usage_of(p) == (12, 99, None, None, 99)
    assert (p.finish_reason, p.usage_source) == ("MAX_TOKENS", "reported")


def test_gemini_stream_last_chunk_drops_candidates_and_wins_whole():
    p, t = stream("generate_content", GEMINI_LAST_DROPS_CANDIDATES)
    # output = total − prompt (14 candidates + 30 thoughts), not the thoughts alone; the cached
    # count of the first chunk is not kept: the last usageMetadata wins whole.
    assert usage_of(p) == (8, 44, None, None, 30)
    assert (p.finish_reason, p.stream_complete, t.content_events) == ("STOP", True, 3)


def test_gemini_usage_rules():
    def u(**m):
        r = gemini_usage(m)
        return r and (r.input, r.output, r.reasoning)
    assert u(promptTokenCount=5, thoughtsTokenCount=7) == (5, 7, 7)  # no total: thoughts
    # total − prompt is never taken below the thoughts
    assert u(promptTokenCount=5, thoughtsTokenCount=7, totalTokenCount=10) == (5, 7, 7)
    assert u(promptTokenCount=5, candidatesTokenCount=2, thoughtsTokenCount=7,
             totalTokenCount=99) == (5, 9, 7)  # candidates reported: the parts are kept
    assert u(promptTokenCount=5, totalTokenCount=5) == (5, 0, None)  # nothing generated
    assert u(trafficType="ON_DEMAND") is None
    a = Usage(input=10, output=9, cached=4, reasoning=3)
    a.merge(gemini_usage({"promptTokenCount": 10, "candidatesTokenCount": 0}))
    assert (a.input, a.output, a.cached, a.reasoning) == (10, 0, None, None)


# -- Cohere v2 --------------------------------------------------------------------------------

COHERE_STREAM = sse(
    {"id": "29f14a5a-11de-4cae-9800-25e4747408ea", "type": "message-start",
     "delta": {"message": {"role": "assistant", "content": [], "tool_plan": "", "tool_calls": [],
                           "citations": []}}},
    {"type": "content-start", "index": 0,
     "delta": {"message": {"content": {"type": "text", "text": ""}}}},
    {"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": "Hello"}}}},
    {"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": " there!"}}}},
    {"type": "content-end", "index": 0},
    {"type": "message-end", "delta": {"finish_reason": "COMPLETE", "usage": {
        "billed_units": {"input_tokens": 3, "output_tokens": 3},
        "tokens": {"input_tokens": 69, "output_tokens": 3}}}},
    named=True,
)

COHERE_TOOL_STREAM = sse(
    {"id": "b3c1e0f4-0c8f-4f55-9d8c-5a7d1a9c2f10", "type": "message-start",
     "delta": {"message": {"role": "assistant", "content": [], "tool_plan": "", "tool_calls": [],
                           "citations": []}}},
    {"type": "tool-plan-delta", "delta": {"message": {"tool_plan": "I will look up the weather"}}},
    {"type": "tool-call-start", "index": 0, "delta": {"message": {"tool_calls": {
        "id": "get_weather_1byjy32y4hvq", "type": "function",
        "function": {"name": "get_weather", "arguments": ""}}}}},
    {"type": "tool-call-delta", "index": 0, "delta": {"message": {"tool_calls": {
        "function": {"arguments": "{\"location\": \"Toronto\"}"}}}}},
    {"type": "tool-call-end", "index": 0},
    {"type": "message-end", "delta": {"finish_reason": "TOOL_CALL", "usage": {
        "billed_units": {"input_tokens": 37, "output_tokens": 28}}}},
    named=True,
)

COHERE_CHAT_BODY = {
    "id": "c14c80c3-18eb-4519-9460-6c92edd8cfb4", "finish_reason": "COMPLETE",
    "message": {"role": "assistant",
                "content": [{"type": "text", "text": "LLMs are neural networks ..."}]},
    "usage": {"billed_units": {"input_tokens": 5, "output_tokens": 418},
              "tokens": {"input_tokens": 71, "output_tokens": 418}},
}

COHERE_EMBED_BODY = {
    "id": "da6e531f-54c6-4a73-bf92-f60566d8d753",
    "embeddings": {"float": [[0.016296387, 0.008354187, 0.04699707]]},
    "texts": ["hello"],
    "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": 1}},
    "response_type": "embeddings_by_type",
}


@pytest.mark.parametrize("step", [None, 7])
def test_cohere_chat_stream(step):
    p, t = stream(fmt_of("POST", "/v2/chat"), COHERE_STREAM, step=step)
    assert usage_of(p) == (69, 3, None, None, None)  # tokens win over billed_units
    assert (p.finish_reason, p.chat_id, p.stream_complete) == (
        "COMPLETE", "29f14a5a-11de-4cae-9800-25e4747408ea", True)
    assert t.content_events == 2 and p.problems == []


def test_cohere_tool_stream_billed_units_only():
    p, t = stream("cohere_chat", COHERE_TOOL_STREAM)
    assert usage_of(p)[:2] == (37, 28)
    assert (p.finish_reason, p.stream_complete, t.content_events) == ("TOOL_CALL", True, 3)


def test_cohere_stream_error_in_message_end():
    body = sse({"id": "x1", "type": "message-start", "delta": {"message": {"role": "assistant"}}},
               {"type": "message-end", "delta": {"finish_reason": "ERROR",
                                                 "error": "internal server error"}})
    p, _ = stream("cohere_chat", body)
    assert (p.stream_error, p.finish_reason) == ("internal server error", "ERROR")


def test_cohere_chat_and_embed_bodies():
    p = whole("cohere_chat", COHERE_CHAT_BODY)
    assert usage_of(p) == (71, 418, None, None, None)
    assert (p.finish_reason, p.chat_id) == ("COMPLETE", "c14c80c3-18eb-4519-9460-6c92edd8cfb4")
    p = whole(fmt_of("POST", "/v2/embed"), COHERE_EMBED_BODY)
    assert usage_of(p) == (1, None, None, None, None) and p.usage_source == "reported"


# -- Gemini / Vertex embeddings ---------------------------------------------------------------

def test_gemini_and_vertex_embedding_bodies():
    p = whole("embed_content", {"embedding": {"values": [0.013168523, -0.008711934]}})
    assert (usage_of(p), p.usage_source) == ((None,) * 5, "missing")
    p = whole("embed_content", {"embeddings": [
        {"values": [0.1], "statistics": {"tokenCount": 4, "truncated": False}},
        {"values": [0.2], "statistics": {"tokenCount": 6, "truncated": False}}]})
    assert usage_of(p) == (10, None, None, None, None)
    p = whole("embed_content", {"embedding": {"values": [0.1]}, "truncated": False,
                                "usageMetadata": {"promptTokenCount": 7, "totalTokenCount": 7}})
    assert usage_of(p) == (7, None, None, None, None)  # no output invented
    vertex = {"predictions": [
        {"embeddings": {"statistics": {"truncated": False, "token_count": 6},
                        "values": [0.0058424929156899452, 0.011848051100969315]}},
        {"embeddings": {"statistics": {"truncated": False, "token_count": 3.0},
                        "values": [0.02]}}],
        "metadata": {"billableCharacterCount": 40}}
    p = whole(fmt_of("POST", "/v1/projects/p/locations/us-central1/publishers/google/models/"
                             "text-embedding-005:predict"), vertex)
    assert usage_of(p) == (9, None, None, None, None)


# -- token-counting endpoints: counted_tokens, never usage ------------------------------------

@pytest.mark.parametrize("path,body,count", [
    ("/v1/messages/count_tokens", {"input_tokens": 2095}, 2095),
    ("/v1beta/models/gemini-2.5-flash:countTokens",
     {"totalTokens": 31, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 31}]}, 31),
    ("/v1/responses/input_tokens", {"object": "response.input_tokens", "input_tokens": 11}, 11),
    ("/model/anthropic.claude-3-5-haiku-20241022-v1:0/count-tokens", {"inputTokens": 123}, 123),
])
def test_counting_endpoints(path, body, count):
    m = match_api("POST", path)
    assert (m.api, m.operation) == ("count_tokens", "count_tokens")
    p = whole(m.fmt, body)
    assert p.counted_tokens == count
    assert usage_of(p) == (None,) * 5 and p.usage_source == "missing" and p.problems == []
    assert Parsed.from_plain(p.to_plain()) == p
    # by api name (offline use): every counting shape is read by the one counting reader
    assert whole("count_tokens", body).counted_tokens == count


def test_counting_invalid_is_marked():
    p = whole("count_tokens", {"input_tokens": -3})
    assert p.counted_tokens is None and [x.kind for x in p.problems] == ["invalid_usage"]


# -- audio and images (llama-swap meters them too) --------------------------------------------

BOUNDARY = "----WebKitFormBoundary7MA4YWxkTrZu0gW"


def multipart(fields: list[tuple[str, bytes, str | None]], boundary: str = BOUNDARY) -> bytes:
    out = b""
    for name, value, filename in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode()
        if filename:
            out += b"Content-Type: audio/mpeg\r\n"
        out += b"\r\n" + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


AUDIO = b"ID3\x04\x00\x00\x00\x00\x00\x00\xff\xfb\x90d\r\n\r\n" + bytes(range(256)) * 8 + \
    b'Content-Disposition: form-data; name="model"\r\n\r\nnot-this\r\n'
MULTIPART_CT = f"multipart/form-data; boundary={BOUNDARY}"


def test_multipart_model_and_stream_fields():
    body = multipart([("file", AUDIO, "speech.mp3"), ("model", b"whisper-large-v3", None),
                      ("response_format", b"json", None), ("stream", b"true", None)])
    fmt = fmt_of("POST", "/v1/audio/transcriptions")
    r = read_request(body, None, content_type=MULTIPART_CT, fmt=fmt)
    assert (r.model, r.stream, r.chat_round, r.problem) == ("whisper-large-v3", True, None, None)
    # model first (the OpenAI SDKs send fields before files); a quoted boundary
    body = multipart([("model", b"gpt-image-1", None), ("prompt", b"a cat", None),
                      ("image[]", AUDIO, "cat.png")], boundary="abc'()+_,-./:=?")
    r = read_request(body, None, content_type='multipart/form-data; boundary="abc\'()+_,-./:=?"')
    assert (r.model, r.problem) == ("gpt-image-1", None)


def test_multipart_upload_over_max_body_is_scanned_in_its_head():
    big = b"\x00" * 4096
    body = multipart([("model", b"whisper-1", None), ("file", big, "a.mp3")])
    r = read_request(body, None, max_body=1024, content_type=MULTIPART_CT)
    assert (r.model, r.problem) == ("whisper-1", None)
    body = multipart([("file", big, "a.mp3"), ("model", b"whisper-1", None)])
    r = read_request(body, None, max_body=1024, content_type=MULTIPART_CT)
    assert r.model is None and r.problem.detail == "request body over 1024 bytes, not read"


def test_urlencoded_model():
    r = read_request(b"model=kokoro%2Fv1.0&input=Hello+world&voice=af_sky&stream=false", None,
                     content_type="application/x-www-form-urlencoded; charset=utf-8")
    assert (r.model, r.stream, r.problem) == ("kokoro/v1.0", False, None)
    assert read_request(b"input=x", None,
                        content_type="application/x-www-form-urlencoded").model is None


def test_audio_responses():
    tr = fmt_of("POST", "/v1/audio/transcriptions")
    p = whole(tr, {"text": "Imagine the wildest idea that you've ever had.",
                   "usage": {"type": "tokens", "input_tokens": 14,
                             "input_token_details": {"text_tokens": 0, "audio_tokens": 14},
                             "output_tokens": 45, "total_tokens": 59}})
    assert usage_of(p)[:2] == (14, 45) and p.problems == []
    p = whole(tr, {"text": "Hello.", "usage": {"type": "duration", "seconds": 9}})
    assert (p.usage_source, p.problems) == ("missing", [])  # seconds are not tokens
    p = whole(fmt_of("POST", "/v1/audio/translations"), b"Hello, how are you?\n")  # text format
    assert (p.usage_source, p.problems) == ("missing", [])
    p = whole(fmt_of("POST", "/v1/audio/speech"), b"ID3\x04\x00\x00\x00\x00\x00\x23TSSE")
    assert (p.usage_source, p.problems) == ("missing", [])  # audio bytes: nothing to read
    p = parse_body("audio_speech", b"\xff\xfb" * 100, None, max_body=50)
    assert p.problems == []
    assert whole("audio_speech", b"{not json").details == ["invalid JSON"]


def test_audio_streams():
    speech = sse({"type": "speech.audio.delta", "audio": "SUQzBAAAAAAAI1RTU0U="},
                 {"type": "speech.audio.delta", "audio": "//uQZAAAAAAA"},
                 {"type": "speech.audio.done",
                  "usage": {"input_tokens": 14, "output_tokens": 101, "total_tokens": 115}})
    p, t = stream("audio_speech", speech)
    assert (usage_of(p)[:2], p.stream_complete, t.content_events) == ((14, 101), True, 2)
    tr = sse({"type": "transcript.text.delta", "delta": "I", "logprobs": []},
             {"type": "transcript.text.delta", "delta": " see skies.", "logprobs": []},
             {"type": "transcript.text.done", "text": "I see skies.",
              "usage": {"type": "tokens", "input_tokens": 14, "output_tokens": 4,
                        "total_tokens": 18}})
    p, t = stream("audio_transcriptions", tr)
    assert (usage_of(p)[:2], p.stream_complete, t.content_events) == ((14, 4), True, 2)


def test_image_responses():
    gen = {"created": 1713833628, "data": [{"b64_json": "iVBORw0KGgo="}], "background": "opaque",
           "output_format": "png", "quality": "high", "size": "1024x1024",
           "usage": {"total_tokens": 100, "input_tokens": 50, "output_tokens": 50,
                     "input_tokens_details": {"text_tokens": 10, "image_tokens": 40}}}
    p = whole(fmt_of("POST", "/v1/images/generations"), gen)
    assert usage_of(p) == (50, 50, None, None, None)
    p = whole("sdapi_txt2img", {"images": ["iVBORw0KGgo="], "parameters": {"prompt": "a cat"},
                                "info": "{\"seed\": 42}"})
    assert (p.usage_source, p.problems) == ("missing", [])
    edit = sse({"type": "image_edit.partial_image", "b64_json": "iVBO", "partial_image_index": 0,
                "created_at": 1759000000, "size": "1024x1024", "quality": "low",
                "background": "opaque", "output_format": "png"},
               {"type": "image_edit.completed", "b64_json": "iVBORw0KGgo=",
                "created_at": 1759000003, "size": "1024x1024", "quality": "low",
                "background": "opaque", "output_format": "png",
                "usage": {"total_tokens": 300, "input_tokens": 100, "output_tokens": 200,
                          "input_tokens_details": {"text_tokens": 20, "image_tokens": 80}}},
               named=True)
    p, t = stream(fmt_of("POST", "/v1/images/edits"), edit)
    assert (usage_of(p)[:2], p.stream_complete, t.content_events) == ((100, 200), True, 2)


# -- OpenAI Responses background mode ---------------------------------------------------------

def _resp(status: str, usage: dict | None = None, **extra) -> dict:
    return {"id": "resp_68af1b0e0c6c8196a8d4ad0a3fe7e1f5", "object": "response",
            "created_at": 1756306190, "status": status, "background": True, "error": None,
            "incomplete_details": None, "model": "o3-2025-04-16", "output": [],
            "usage": usage, **extra}


USAGE = {"input_tokens": 36, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 87,
         "output_tokens_details": {"reasoning_tokens": 64}, "total_tokens": 123}


def test_background_post_poll_and_cancel():
    p = whole(fmt_of("POST", "/v1/responses"), _resp("queued"))
    assert (p.usage_source, p.finish_reason, p.response_status, p.chat_id) == (
        "missing", "queued", "queued", "resp_68af1b0e0c6c8196a8d4ad0a3fe7e1f5")
    poll = fmt_of("GET", "/v1/responses/resp_68af1b0e0c6c8196a8d4ad0a3fe7e1f5")
    p = whole(poll, _resp("in_progress"))
    assert (p.usage_source, p.response_status) == ("missing", "in_progress")
    p = whole(poll, _resp("completed", USAGE))
    assert usage_of(p) == (36, 87, 0, None, 64)
    assert (p.response_status, p.finish_reason, p.chat_id) == (
        "completed", "completed", "resp_68af1b0e0c6c8196a8d4ad0a3fe7e1f5")
    p = whole(poll, _resp("failed", None, error={"code": "server_error",
                                                 "message": "The model failed."}))
    assert (p.response_status, p.stream_error, p.stream_error_type) == (
        "failed", "The model failed.", "server_error")
    p = whole(fmt_of("POST", "/v1/responses/resp_68af1b0e0c6c8196a8d4ad0a3fe7e1f5/cancel"),
              _resp("cancelled"))
    assert (p.response_status, p.finish_reason, p.usage_source) == (
        "cancelled", "cancelled", "missing")
    assert Parsed.from_plain(p.to_plain()) == p


def test_background_stream_and_resume():
    rid = "resp_68af1b0e0c6c8196a8d4ad0a3fe7e1f5"
    first = sse({"type": "response.queued", "sequence_number": 0, "response": _resp("queued")},
                {"type": "response.created", "sequence_number": 1,
                 "response": _resp("in_progress")},
                {"type": "response.output_text.delta", "sequence_number": 2, "item_id": "msg_1",
                 "output_index": 0, "content_index": 0, "delta": "Hel"}, named=True)
    p, t = stream("responses", first)  # cut by the client before the end
    assert (p.response_status, p.chat_id, p.stream_complete, t.content_events) == (
        "in_progress", rid, False, 1)
    resumed = sse({"type": "response.output_text.delta", "sequence_number": 3,
                   "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": "lo"},
                  {"type": "response.completed", "sequence_number": 4,
                   "response": _resp("completed", USAGE)}, named=True)
    m = match_api("GET", f"/v1/responses/{rid}?stream=true&starting_after=2")
    p, t = stream(m.fmt, resumed)
    assert usage_of(p) == (36, 87, 0, None, 64)
    assert (p.response_status, p.chat_id, p.stream_complete, t.content_events) == (
        "completed", rid, True, 1)


def test_responses_compact():
    body = {"id": "resp_001", "object": "response.compaction", "created_at": 1764967971,
            "output": [{"id": "msg_000", "type": "message", "status": "completed",
                        "content": [{"type": "input_text", "text": "Create a landing page"}],
                        "role": "user"},
                       {"id": "cmp_001", "type": "compaction",
                        "encrypted_content": "gAAAAABpM0Yj-...="}],
            "usage": {"input_tokens": 139, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": 438, "output_tokens_details": {"reasoning_tokens": 64},
                      "total_tokens": 577}}
    p = whole(fmt_of("POST", "/v1/responses/compact"), body)
    assert usage_of(p) == (139, 438, 0, None, 64)
    assert (p.chat_id, p.response_status) == ("resp_001", None)


# -- usage and errors in less common places ---------------------------------------------------

GROQ = sse(
    {"id": "chatcmpl-9a1b", "object": "chat.completion.chunk", "created": 1730241104,
     "model": "llama-3.1-8b-instant", "system_fingerprint": "fp_9cb648b966",
     "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}],
     "x_groq": {"id": "req_01jbd6g2qdfw2adyrt2az8hz4w"}},
    {"id": "chatcmpl-9a1b", "object": "chat.completion.chunk", "created": 1730241104,
     "model": "llama-3.1-8b-instant", "system_fingerprint": "fp_9cb648b966",
     "choices": [{"index": 0, "delta": {"content": "Hello"}, "logprobs": None,
                  "finish_reason": None}]},
    {"id": "chatcmpl-9a1b", "object": "chat.completion.chunk", "created": 1730241104,
     "model": "llama-3.1-8b-instant", "system_fingerprint": "fp_9cb648b966",
     "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
     "x_groq": {"id": "req_01jbd6g2qdfw2adyrt2az8hz4w",
                "usage": {"queue_time": 0.016, "prompt_tokens": 40, "prompt_time": 0.0022,
                          "completion_tokens": 8, "completion_time": 0.0067,
                          "total_tokens": 48, "total_time": 0.0089}}},
    "[DONE]",
)


def test_groq_x_groq_usage_and_id():
    p, t = stream("chat_completions", GROQ)
    assert usage_of(p)[:2] == (40, 8) and p.usage_source == "reported"
    assert (p.chat_id, p.finish_reason, t.content_events) == ("chatcmpl-9a1b", "stop", 1)
    assert "groq" in p.hints
    # no top-level id: x_groq.id names the response
    body = sse({"choices": [{"index": 0, "delta": {"content": "x"}}],
                "x_groq": {"id": "req_01x"}}, "[DONE]")
    p, _ = stream("chat_completions", body)
    assert p.chat_id == "req_01x"
    # a top-level usage wins over x_groq's
    body = sse({"id": "c", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1},
                "x_groq": {"id": "r", "usage": {"prompt_tokens": 40, "completion_tokens": 8}}})
    p, _ = stream("chat_completions", body)
    assert usage_of(p)[:2] == (5, 1)


OPENROUTER_ERROR = sse(
    {"id": "gen-1750000000-AbCdEf", "provider": "OpenAI", "model": "openai/gpt-4o",
     "object": "chat.completion.chunk", "created": 1750000000,
     "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"},
                  "finish_reason": None, "native_finish_reason": None, "logprobs": None}]},
    {"id": "gen-1750000000-AbCdEf", "object": "chat.completion.chunk", "created": 1750000000,
     "model": "openai/gpt-4o", "provider": "OpenAI",
     "error": {"code": "server_error", "message": "Provider disconnected unexpectedly"},
     "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]},
)


def test_openrouter_mid_stream_error_beside_choices():
    p, t = stream("chat_completions", OPENROUTER_ERROR)
    assert (p.stream_error, p.stream_error_type) == ("Provider disconnected unexpectedly",
                                                     "server_error")
    assert (p.finish_reason, p.chat_id, t.content_events) == ("error", "gen-1750000000-AbCdEf", 1)
    assert "openrouter" in p.hints
    body = sse({"id": "gen-1", "choices": [{"index": 0, "delta": {"content": "a"}}]},
               {"error": {"message": "Upstream error", "code": 502}})
    p, _ = stream("chat_completions", body)
    assert (p.stream_error, p.stream_error_type) == ("Upstream error", "502")
    # an empty error object beside choices is no error
    body = sse({"id": "c", "error": {}, "choices": [{"index": 0, "delta": {"content": "a"}}]})
    p, _ = stream("chat_completions", body)
    assert p.stream_error is None


def test_anthropic_cache_read_zero_later_recomputes_input():
    start = {"type": "message_start", "message": {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
        "model": "claude-sonnet-4-5-20250929", "content": [], "stop_reason": None,
        "usage": {"input_tokens": 10, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 100, "output_tokens": 1}}}
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
             "usage": {"cache_read_input_tokens": 0, "output_tokens": 25}}
    body = sse(start, {"type": "content_block_delta", "index": 0,
                       "delta": {"type": "text_delta", "text": "Hi"}},
               delta, {"type": "message_stop"}, named=True)
    p, _ = stream("messages", body)
    assert usage_of(p) == (10, 25, 0, 0, None)  # not 110 with 0 cached
    # a later input_tokens of 0 does not replace the uncached part; cache parts do
    delta2 = {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
              "usage": {"input_tokens": 0, "cache_read_input_tokens": 100,
                        "cache_creation_input_tokens": 0, "output_tokens": 25}}
    p, _ = stream("messages", sse(start, delta2, {"type": "message_stop"}, named=True))
    assert usage_of(p) == (110, 25, 100, 0, None)


# -- llama.cpp details ------------------------------------------------------------------------

LLAMACPP_COMPLETION = {
    "index": 0, "content": " the capital of France is Paris", "tokens": [], "id_slot": 0,
    "stop": True, "model": "gpt-3.5-turbo", "tokens_predicted": 8, "tokens_evaluated": 5,
    "generation_settings": {"n_predict": 8, "seed": 4294967295, "temperature": 0.8},
    "prompt": "<s> The", "has_new_line": False, "truncated": False, "stop_type": "limit",
    "stopping_word": "", "tokens_cached": 12,
    "timings": {"prompt_n": 5, "prompt_ms": 20.1, "prompt_per_second": 248.7,
                "predicted_n": 8, "predicted_ms": 80.2, "predicted_per_second": 99.7},
}


def test_llamacpp_stop_type():
    m = match_api("POST", "/completion")
    p = whole(m.fmt, LLAMACPP_COMPLETION)
    assert (p.finish_reason, usage_of(p)[:2], p.hints) == ("limit", (5, 8), ["llama.cpp"])
    old = dict(LLAMACPP_COMPLETION, stopped_eos=False, stopped_word=True, stopped_limit=False,
               stopping_word="\n")
    del old["stop_type"]
    assert whole(m.fmt, old).finish_reason == "word"
    body = sse({"content": "Hel", "tokens": [], "stop": False, "id_slot": 0,
                "tokens_predicted": 1, "tokens_evaluated": 5},
               {"content": "lo", "tokens": [], "stop": False, "id_slot": 0,
                "tokens_predicted": 2, "tokens_evaluated": 5},
               dict(LLAMACPP_COMPLETION, content="", stop_type="eos"))
    p, t = stream(m.fmt, body)
    assert (p.finish_reason, p.stream_complete, t.content_events) == ("eos", True, 2)
    assert whole(m.fmt, dict(LLAMACPP_COMPLETION, stop_type="none")).finish_reason is None


def test_chat_round_only_for_chat_like_operations():
    body = b'{"model":"text-embedding-3-small","input":"The food was delicious"}'
    assert read_request(body, fmt=match_api("POST", "/v1/embeddings")).chat_round is None
    assert read_request(body, fmt=by_api("embeddings")).chat_round is None
    assert read_request(body, fmt=match_api("POST", "/v1/responses")).chat_round == 1
    assert read_request(body).chat_round == 1  # no format given: the body alone decides
    speech = b'{"model":"tts-1","input":"Hello","voice":"alloy"}'
    assert read_request(speech, fmt=match_api("POST", "/v1/audio/speech")).chat_round is None
    cohere = b'{"model":"command-a-03-2025","messages":[{"role":"user","content":"hi"}]}'
    assert read_request(cohere, fmt=match_api("POST", "/v2/chat")).chat_round == 1
    count = b'{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"hi"}]}'
    assert read_request(count, fmt=match_api("POST", "/v1/messages/count_tokens")
                        ).chat_round is None


# -- provider markers in response bodies ------------------------------------------------------

def test_response_markers_become_hints():
    vllm = {"id": "chatcmpl-b6f2", "object": "chat.completion", "created": 1745000000,
            "model": "Qwen/Qwen3-8B",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi",
                                                 "reasoning_content": None, "tool_calls": []},
                         "logprobs": None, "finish_reason": "stop", "stop_reason": None}],
            "usage": {"prompt_tokens": 9, "total_tokens": 10, "completion_tokens": 1,
                      "prompt_tokens_details": None},
            "prompt_logprobs": None, "kv_transfer_params": None}
    assert whole("chat_completions", vllm).hints == ["vllm"]
    ollama = {"id": "chatcmpl-163", "object": "chat.completion", "created": 1745000000,
              "model": "llama3.2", "system_fingerprint": "fp_ollama",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                           "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 26, "completion_tokens": 2, "total_tokens": 28}}
    assert whole("chat_completions", ollama).hints == ["ollama"]
    llama = dict(ollama, system_fingerprint="b6139-7fb0b2f3")
    assert whole("chat_completions", llama).hints == ["llama.cpp"]
    deepseek = dict(ollama, system_fingerprint="fp_8802369eaa_prod0623_fp8_kvcache",
                    usage={"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12,
                           "prompt_cache_hit_tokens": 0, "prompt_cache_miss_tokens": 10})
    assert whole("chat_completions", deepseek).hints == ["deepseek"]
    plain = dict(ollama, system_fingerprint="fp_f33640a400")
    assert whole("chat_completions", plain).hints == []


# -- the short path reads every new stream as the full reading does ---------------------------

@pytest.mark.parametrize("api,body", [
    ("cohere_chat", COHERE_STREAM), ("cohere_chat", COHERE_TOOL_STREAM),
    ("chat_completions", GROQ), ("chat_completions", OPENROUTER_ERROR),
    ("generate_content", GEMINI_LAST_DROPS_CANDIDATES),
])
def test_short_path_never_changes_a_result(api, body):
    results = []
    for fast in (True, False):
        obs = StreamObserver(api, framer_for("text/event-stream")(), None, 0.0)
        obs.reader.fast = fast
        obs.feed(body, 0.1)
        results.append((obs.finish(True), obs.timing().content_events))
    assert results[0] == results[1]


def test_parsed_plain_round_trip_and_old_metadata():
    p = Parsed(counted_tokens=5, response_status="queued")
    assert Parsed.from_plain(p.to_plain()) == p
    old = p.to_plain()
    del old["counted_tokens"], old["response_status"]  # metadata written before this change
    q = Parsed.from_plain(old)
    assert (q.counted_tokens, q.response_status) == (None, None)
