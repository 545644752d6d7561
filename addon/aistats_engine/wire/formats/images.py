"""Image generation: OpenAI ``/v1/images/generations`` and ``/v1/images/edits`` (an edit is a
multipart upload whose model is the form field ``model``), and the Stable Diffusion web UI API
that llama-swap meters in front of stable-diffusion.cpp (``/sdapi/v1/txt2img``,
``/sdapi/v1/img2img``; JSON bodies with ``model``).

OpenAI reports ``usage`` ``{input_tokens, output_tokens, input_tokens_details}`` for its GPT
image models (read like Responses usage); streams (``stream: true``) are SSE
``image_generation.partial_image`` / ``image_edit.partial_image`` events ended by
``image_generation.completed`` / ``image_edit.completed``, which carries the usage. The SD API
reports no usage.
"""

from __future__ import annotations

from ..format import WireFormat
from ..reader import ResponseState


class _Images(WireFormat):
    operation = "image_generation"
    fallback_provider = "openai"
    prefix: str = ""

    def event(self, state: ResponseState, name: str | None, obj: dict) -> bool:
        state.common(obj)
        t = obj.get("type")
        if t == self.prefix + ".completed":
            state.complete = True
        elif t != self.prefix + ".partial_image":
            return False
        return bool(obj.get("b64_json"))


class Generations(_Images):
    api = "images_generations"
    suffixes = ("/images/generations",)
    prefix = "image_generation"


class Edits(_Images):
    api = "images_edits"
    suffixes = ("/images/edits",)
    prefix = "image_edit"


class SDTxt2Img(WireFormat):
    api = "sdapi_txt2img"
    operation = "image_generation"
    suffixes = ("/sdapi/v1/txt2img",)


class SDImg2Img(SDTxt2Img):
    api = "sdapi_img2img"
    suffixes = ("/sdapi/v1/img2img",)


GENERATIONS = Generations()
EDITS = Edits()
SD_TXT2IMG = SDTxt2Img()
SD_IMG2IMG = SDImg2Img()
