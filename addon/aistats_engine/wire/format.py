"""What a wire format is: one registered unit per LLM API shape (``wire/formats/``).

A :class:`WireFormat` says which requests speak it (``methods``, POST unless it says otherwise,
and ``match`` on the path), how one stream event and one whole body are read into a
:class:`~aistats_engine.wire.reader.ResponseState` (``event``, ``body``), where its end-of-stream
marker is (``event`` sets ``state.complete``), how its transport wraps events (``unwrap``, e.g.
Bedrock's base64 payloads) and which plain delta events may skip the full reading (``short``).
Adding a format is one module in ``wire/formats/`` and one line in its registry; nothing else
names formats.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from .usage import Usage, read_counted, read_usage

if TYPE_CHECKING:
    from .reader import ResponseState


class Match:
    """A request path matched to its format, with what the path itself says."""

    __slots__ = ("fmt", "model_from_path", "stream_from_path")

    def __init__(self, fmt: WireFormat, model_from_path: str | None = None,
                 stream_from_path: bool = False) -> None:
        self.fmt = fmt
        self.model_from_path = model_from_path
        self.stream_from_path = stream_from_path

    @property
    def api(self) -> str:
        return self.fmt.api

    @property
    def operation(self) -> str:
        return self.fmt.operation

    @property
    def provider(self) -> str | None:
        return self.fmt.provider

    def with_model(self, model: str | None) -> Match:
        return Match(self.fmt, self.model_from_path or model, self.stream_from_path)


_ROUND_OPERATIONS = frozenset({"chat", "text_completion", "generate_content", ""})


class WireFormat:
    """Defaults shared by the formats; each format overrides what differs."""

    api: ClassVar[str] = ""  # record ``api``
    operation: ClassVar[str] = ""  # OTel ``gen_ai.operation.name``
    methods: ClassVar[tuple[str, ...]] = ("POST",)  # HTTP methods it is spoken with
    # A successful body may be something else than JSON (audio bytes, plain-text transcripts):
    # not reading it is then no problem of the record.
    opaque_body: ClassVar[bool] = False
    provider: ClassVar[str | None] = None  # implied by the path alone (else host/body decide)
    # The provider when neither the host nor the body tells (``openai`` for OpenAI's formats).
    fallback_provider: ClassVar[str | None] = None
    anthropic_usage: ClassVar[bool] = False  # an ``input_tokens`` usage shape is Anthropic's
    suffixes: ClassVar[tuple[str, ...]] = ()  # path suffixes (query and trailing / removed)
    exact: ClassVar[tuple[str, ...]] = ()  # whole paths
    # Transport wrapping of one event: (name, data) → (name, inner data), None to skip it.
    unwrap: ClassVar[Callable[[str | None, bytes], tuple[str | None, bytes] | None] | None] = None
    # Plain delta events: True/False (content or not) when the event can change nothing else,
    # None when it must be read in full. Checked equal to the full reading in the tests.
    short: ClassVar[Callable[[dict], bool | None] | None] = None
    # For a plain event (``short`` gave a verdict): the key whose string value alone varies
    # between such chunks and decides their verdict (non-empty: content), or None. Lets later
    # chunks be recognised by their bytes (wire/templates.py).
    template_key: ClassVar[Callable[[dict], bytes | None] | None] = None

    @property
    def has_rounds(self) -> bool:
        """Only chat-like operations count user messages (``chat_round``); unknown traffic
        (the generic reading) lets the body decide."""
        return self.operation in _ROUND_OPERATIONS

    def match(self, path: str) -> Match | None:
        if (self.suffixes and path.endswith(self.suffixes)) or path in self.exact:
            return Match(self)
        return None

    def read_usage(self, obj: dict) -> Usage | None:
        return read_usage(obj, self.anthropic_usage)

    def error_event(self, name: str | None, obj: dict) -> bool:
        """An error event inside a stream (SSE ``event: error``, ``{"type": "error"}``, or a
        chunk with a top-level ``error`` object: OpenRouter sends one mid-stream, beside
        ``choices`` or not; an empty ``error: {}`` beside choices is not one)."""
        err = obj.get("error")
        return (name == "error" or obj.get("type") == "error"
                or (err.__class__ is dict and (bool(err) or "choices" not in obj)))

    def event(self, state: ResponseState, name: str | None, obj: dict) -> bool:
        """Read one stream event; True when it carries generated content."""
        state.common(obj)
        return False

    def body(self, state: ResponseState, obj: Any) -> None:
        """Read a whole (non-streamed) JSON body. llama.cpp answers a list of prompts (and
        ``/infill``) with a JSON array: its last element carries the timings."""
        if isinstance(obj, list):
            obj = obj[-1] if obj else None
        if isinstance(obj, dict):
            state.common(obj)

    def __repr__(self) -> str:
        return f"<WireFormat {self.api} ({type(self).__module__.rsplit('.', 1)[-1]})>"


class CountingFormat(WireFormat):
    """A token-counting endpoint (Anthropic ``count_tokens``, Gemini ``countTokens``, OpenAI
    ``responses/input_tokens``, Bedrock ``count-tokens``): its answer is a quote, not usage.
    The count goes to ``counted_tokens``; usage stays empty."""

    api = "count_tokens"
    operation = "count_tokens"

    def read_usage(self, obj: dict) -> Usage | None:
        return None

    def body(self, state: ResponseState, obj: Any) -> None:
        super().body(state, obj)
        if isinstance(obj, dict):
            state.counted_tokens, state.counted_invalid = read_counted(obj)
