"""Higress's access-log form (``--set aistats_higress_log=PATH``, a ``JsonlOutput``): one
``{"ai_log": "<JSON string>"}`` per line with Higress's field names, so log pipelines built for
Higress keep working; ``as_separate_log_field`` attributes stand beside ``ai_log``, as
Higress's ``%FILTER_STATE(wasm.<key>)%`` fields do.

Field names and meanings (Higress ai-statistics): ``model`` (the response's model, else the
requested one), ``input_token``, ``output_token``, ``total_token`` (only when usage was read),
``llm_first_token_duration`` (streams: ms to the first content chunk), ``llm_service_duration``
(ms), ``response_type`` (``stream`` | ``normal``), ``chat_id``, ``chat_round``, ``session_id``,
then every ``apply_to_log`` attribute.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..record.record import Record
from .bus import Finished


def ai_log(rec: Record) -> dict[str, Any]:
    """The ``ai_log`` object of one record (before it is turned into a JSON string)."""
    out: dict[str, Any] = {}
    if rec.session_id:
        out["session_id"] = rec.session_id
    model = rec.response_model or rec.model
    if model:
        out["model"] = model
    if rec.input_tokens is not None and rec.output_tokens is not None:
        out["input_token"] = rec.input_tokens
        out["output_token"] = rec.output_tokens
        out["total_token"] = rec.total_tokens
    if rec.stream and rec.ttft_ms is not None:
        out["llm_first_token_duration"] = round(rec.ttft_ms)
    if rec.duration_ms is not None:
        out["llm_service_duration"] = round(rec.duration_ms)
    if rec.status is not None:
        out["response_type"] = "stream" if rec.stream else "normal"
    if rec.chat_id:
        out["chat_id"] = rec.chat_id
    if rec.chat_round is not None:
        out["chat_round"] = rec.chat_round
    for key, value in rec.attributes.items():
        if key not in rec.log_fields:
            out[key] = value
    return out


def json_line(event: Finished) -> bytes:
    """``line`` serialised, for ``JsonlOutput``."""
    return orjson.dumps(line(event.record))


def line(rec: Record) -> dict[str, Any]:
    """One access-log line: ``ai_log`` as a JSON string, separate fields beside it."""
    out: dict[str, Any] = {"ai_log": orjson.dumps(ai_log(rec)).decode()}
    for key, value in rec.log_fields.items():
        out[key] = value if isinstance(value, str) else orjson.dumps(value).decode()
    return out
