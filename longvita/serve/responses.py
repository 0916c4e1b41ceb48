"""The OpenAI chat-completions response bodies of `longvita serve`, as plain JSON-able dicts:
a whole completion, stream chunks, the usage chunk, the model list, and their server-sent-event
framing (shapes verified with the real `openai` client: docs/serving.md)."""

from __future__ import annotations

import json
import uuid
from typing import Any

FINISH_REASONS = {"stop_token": "stop", "stop_sequence": "stop", "length": "length"}
"""OpenAI's finish_reason of each engine stop reason."""


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def finish_reason_of(stop_reason: str) -> str:
    """OpenAI's finish_reason for an engine stop reason ("stop_token", "stop_sequence",
    "length")."""
    if stop_reason not in FINISH_REASONS:
        raise ValueError(f"unknown stop reason {stop_reason!r}; expected one of {FINISH_REASONS}")
    return FINISH_REASONS[stop_reason]


def _envelope(id: str, object: str, created: int, model: str) -> dict[str, Any]:
    return {"id": id, "object": object, "created": created, "model": model}


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens`: the prompt tokens whose
    keys and values came from the prefix cache."""
    total = prompt_tokens + completion_tokens
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": total,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_body(
    *,
    id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
) -> dict[str, Any]:
    """A non-stream answer (object "chat.completion")."""
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
    return {
        **_envelope(id, "chat.completion", created, model),
        "choices": [choice],
        "usage": _usage(prompt_tokens, completion_tokens, cached_tokens),
    }


def chunk_body(
    *, id: str, created: int, model: str, delta: dict, finish_reason: str | None
) -> dict[str, Any]:
    """One stream chunk: the first delta has the role, the last `{}` and the finish_reason."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {**_envelope(id, "chat.completion.chunk", created, model), "choices": [choice]}


class ContentEvents:
    """The server-sent events of a stream's text deltas, byte for byte
    `sse_event(chunk_body(..., delta={"content": text}, finish_reason=None))`, with the JSON
    around the text encoded once per stream instead of once per token."""

    def __init__(self, *, id: str, created: int, model: str) -> None:
        marker = "\x00"  # where the text goes: the content is the chunk's last string
        chunk = chunk_body(
            id=id, created=created, model=model, delta={"content": marker}, finish_reason=None
        )
        self._head, _, self._tail = sse_event(chunk).rpartition(_json_string(marker).encode())

    def event(self, text: str) -> bytes:
        return self._head + _json_string(text).encode("utf-8") + self._tail


def _json_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def usage_chunk_body(
    *,
    id: str,
    created: int,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
) -> dict[str, Any]:
    """The chunk after the last one when `include_usage`: no choices, the usage."""
    return {
        **_envelope(id, "chat.completion.chunk", created, model),
        "choices": [],
        "usage": _usage(prompt_tokens, completion_tokens, cached_tokens),
    }


def sse_event(payload: dict | str) -> bytes:
    """One server-sent event: `data: <compact UTF-8 JSON>\\n\\n`; a string (`[DONE]`) as is."""
    if isinstance(payload, str):
        if "\n" in payload or "\r" in payload:
            raise ValueError(f"an event string must be one line, got {payload!r}")
        data = payload
    else:
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + data.encode("utf-8") + b"\n\n"


def model_list_body(model_id: str, *, created: int, max_model_len: int) -> dict[str, Any]:
    """The answer of `GET /v1/models`: the one served model."""
    card = {"id": model_id, "object": "model", "created": created, "owned_by": "longvita"}
    return {"object": "list", "data": [{**card, "max_model_len": max_model_len}]}
