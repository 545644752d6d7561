"""OpenAI-style audio (also what llama-swap meters in front of whisper.cpp, kokoro, …):
``/v1/audio/speech`` (text to speech: the body is audio bytes, or SSE ``speech.audio.delta`` /
``speech.audio.done`` events with ``stream_format: "sse"``), ``/v1/audio/transcriptions`` and
``/v1/audio/translations`` (speech to text: a multipart upload; JSON ``{"text": …}``, plain
text/SRT/VTT, or SSE ``transcript.text.delta`` / ``transcript.text.done`` events).

Usage where the service reports it: ``usage`` ``{input_tokens, output_tokens, …}`` (``type:
tokens`` for transcriptions); a ``{type: duration, seconds}`` usage is no token count and is not
read. The request's model is the form field ``model`` (wire/reader.py ``read_request``).
"""

from __future__ import annotations

from ..format import WireFormat
from ..reader import ResponseState


class _Audio(WireFormat):
    fallback_provider = "openai"
    opaque_body = True  # audio bytes, or a transcript as plain text / SRT / VTT
    delta_type: str = ""
    done_type: str = ""

    def event(self, state: ResponseState, name: str | None, obj: dict) -> bool:
        state.common(obj)
        t = obj.get("type")
        if t == self.done_type:
            state.complete = True
            return False
        return t == self.delta_type and bool(obj.get("delta") or obj.get("audio"))


class Speech(_Audio):
    api = "audio_speech"
    operation = "text_to_speech"
    suffixes = ("/audio/speech",)
    delta_type = "speech.audio.delta"
    done_type = "speech.audio.done"


class Transcriptions(_Audio):
    api = "audio_transcriptions"
    operation = "speech_to_text"
    suffixes = ("/audio/transcriptions",)
    delta_type = "transcript.text.delta"
    done_type = "transcript.text.done"


class Translations(Transcriptions):
    api = "audio_translations"
    suffixes = ("/audio/translations",)


SPEECH = Speech()
TRANSCRIPTIONS = Transcriptions()
TRANSLATIONS = Translations()
