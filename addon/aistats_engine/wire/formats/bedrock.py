"""Amazon Bedrock runtime: Converse / ConverseStream and InvokeModel /
InvokeModelWithResponseStream (``/model/<id>/<action>``; streams are AWS event-stream frames),
and CountTokens (``/model/<id>/count-tokens``).

Converse streams name each frame (``messageStart``, ``contentBlockDelta``, ``messageStop``,
``metadata`` with ``usage``). InvokeModel streams wrap the model's own events in ``chunk`` frames
whose payload is ``{"bytes": "<base64 JSON>"}``: unwrapped here, then read as Anthropic events
(Claude) or by their generic fields; the last chunk carries
``amazon-bedrock-invocationMetrics`` (token counts for every model family). Frames whose name
ends in ``Exception`` (``:exception-type``) are errors of the request.
"""

from __future__ import annotations

import base64
import re
from typing import Any
from urllib.parse import unquote

import orjson

from ..format import CountingFormat, Match, WireFormat
from ..reader import ResponseState
from ..usage import bedrock_invocation_metrics, Usage
from . import anthropic

_PATH = re.compile(r"/model/([^/]+)/(converse|converse-stream|invoke|invoke-with-response-stream)$")
_METRICS = "amazon-bedrock-invocationMetrics"


def _match(fmt: WireFormat, path: str, actions: tuple[str, str]) -> Match | None:
    m = _PATH.search(path)
    if m is None or m.group(2) not in actions:
        return None
    return Match(fmt, unquote(m.group(1)), m.group(2) == actions[1])


class _Bedrock(WireFormat):
    operation = "chat"
    provider = "aws.bedrock"

    def error_event(self, name: str | None, obj: dict) -> bool:
        return (name is not None and name.endswith("Exception")) or super().error_event(name, obj)


class Converse(_Bedrock):
    api = "converse"

    def match(self, path: str) -> Match | None:
        return _match(self, path, ("converse", "converse-stream"))

    def event(self, state: ResponseState, name: str | None, obj: dict) -> bool:
        state.common(obj)
        if name == "metadata" or "metrics" in obj and "usage" in obj:
            state.complete = True
        return name == "contentBlockDelta" or "contentBlockDelta" in obj or (
            isinstance(obj.get("delta"), dict) and "contentBlockIndex" in obj)


def _unwrap(name: str | None, data: bytes) -> tuple[str | None, bytes] | None:
    """``chunk`` frames carry the model's event as base64 in ``bytes``; other frames (errors)
    pass as they are. Raises ValueError on a payload that is not what it claims."""
    if name is not None and name != "chunk":
        return name, data
    obj = orjson.loads(data)
    inner = obj.get("bytes") if isinstance(obj, dict) else None
    if not isinstance(inner, str):
        return name, data
    return None, base64.b64decode(inner, validate=True)


def _generic_content(obj: dict) -> bool:
    """Text of the non-Anthropic model families (Titan ``outputText``, Llama ``generation``,
    Cohere/AI21 ``completion``/``text``, Mistral ``outputs[].text``, OpenAI-style choices)."""
    for key in ("outputText", "generation", "completion", "text"):
        v = obj.get(key)
        if isinstance(v, str) and v:
            return True
    for key in ("outputs", "choices"):
        items = obj.get(key)
        if isinstance(items, list):
            for it in items:
                if isinstance(it, dict) and (it.get("text") or isinstance(it.get("delta"), dict)
                                             and it["delta"].get("content")):
                    return True
    return False


def _family_usage(obj: dict) -> Usage | None:
    """Usage of non-Anthropic families in a whole body (Llama, Titan)."""
    m = {}
    if "prompt_token_count" in obj or "generation_token_count" in obj:
        m = {"inputTokenCount": obj.get("prompt_token_count"),
             "outputTokenCount": obj.get("generation_token_count")}
    elif "inputTextTokenCount" in obj:
        results = obj.get("results")
        out = results[0].get("tokenCount") if isinstance(results, list) and results and \
            isinstance(results[0], dict) else None
        m = {"inputTokenCount": obj.get("inputTextTokenCount"), "outputTokenCount": out}
    return bedrock_invocation_metrics(m) if m else None


class Invoke(_Bedrock):
    api = "invoke"
    anthropic_usage = True  # Claude's usage shape inside InvokeModel
    unwrap = staticmethod(_unwrap)

    def match(self, path: str) -> Match | None:
        return _match(self, path, ("invoke", "invoke-with-response-stream"))

    def event(self, state: ResponseState, name: str | None, obj: dict) -> bool:
        if "type" in obj:
            content = anthropic.read_event(state, obj)
        else:
            state.common(obj)
            state.add_usage(_family_usage(obj))
            content = _generic_content(obj)
        metrics = obj.get(_METRICS)
        if isinstance(metrics, dict):
            state.complete = True
            if state.usage is None:
                state.usage = bedrock_invocation_metrics(metrics)
        return content

    def body(self, state: ResponseState, obj: Any) -> None:
        super().body(state, obj)
        if isinstance(obj, dict) and state.usage is None:
            state.usage = _family_usage(obj)


_COUNT_PATH = re.compile(r"/model/([^/]+)/count-tokens$")


class CountTokens(CountingFormat):
    """``CountTokens`` (``/model/<id>/count-tokens``): ``{"inputTokens": N}`` is
    ``counted_tokens``, not usage."""

    provider = "aws.bedrock"

    def match(self, path: str) -> Match | None:
        m = _COUNT_PATH.search(path)
        return Match(self, unquote(m.group(1))) if m is not None else None


CONVERSE = Converse()
INVOKE = Invoke()
COUNT_TOKENS = CountTokens()
