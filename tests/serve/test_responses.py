"""The OpenAI wire format, responses (longvita.serve.responses): the builders against the shapes
captured from the real `openai` client (reference/TRAINING-SERVING-NOTES.md section 5.1), SSE
framing, error bodies, and a round trip through the real `openai` client over an in-process
`httpx.MockTransport` (no server, no network)."""

from __future__ import annotations

import json
import re

import pytest

from longvita.serve.media import MediaRefused
from longvita.serve.protocol import ApiError, MediaPart, media_api_error
from longvita.serve.responses import (
    ContentEvents,
    chunk_body,
    completion_body,
    finish_reason_of,
    model_list_body,
    new_completion_id,
    sse_event,
    usage_chunk_body,
)
from tests.serve.wire import DATA_URL, VIDEO, parse

# -- responses --------------------------------------------------------------------------------


def test_completion_body_has_the_captured_shape():
    body = completion_body(
        id="chatcmpl-1",
        created=1796041303,
        model="long-vita-tiny",
        text="A cat.",
        finish_reason="stop",
        prompt_tokens=7,
        completion_tokens=5,
        cached_tokens=4,
    )
    assert body == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1796041303,
        "model": "long-vita-tiny",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "A cat."},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 7,
            "completion_tokens": 5,
            "total_tokens": 12,
            "prompt_tokens_details": {"cached_tokens": 4},
        },
    }
    assert json.loads(json.dumps(body)) == body


def test_chunk_bodies_have_the_captured_shape():
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5, "model": "m"}
    first = chunk_body(
        id="chatcmpl-1", created=5, model="m", delta={"role": "assistant", "content": "A"},
        finish_reason=None,
    )  # fmt: skip
    assert first == head | {
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": "A"},
                "logprobs": None,
                "finish_reason": None,
            }
        ]
    }
    last = chunk_body(id="chatcmpl-1", created=5, model="m", delta={}, finish_reason="length")
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "length"
    usage = usage_chunk_body(
        id="chatcmpl-1", created=5, model="m", prompt_tokens=3, completion_tokens=2
    )
    assert usage == head | {
        "choices": [],
        "usage": {
            "prompt_tokens": 3,
            "completion_tokens": 2,
            "total_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }


def test_model_list_body():
    assert model_list_body("long-vita-tiny", created=9, max_model_len=32768) == {
        "object": "list",
        "data": [
            {
                "id": "long-vita-tiny",
                "object": "model",
                "created": 9,
                "owned_by": "longvita",
                "max_model_len": 32768,
            }
        ],
    }


def test_sse_event_framing():
    assert sse_event("[DONE]") == b"data: [DONE]\n\n"
    event = sse_event({"content": "é\n猫", "n": None})
    assert event == 'data: {"content":"é\\n猫","n":null}\n\n'.encode()
    assert event.count(b"\n") == 2
    with pytest.raises(ValueError, match="one line"):
        sse_event("a\nb")


@pytest.mark.parametrize("model", ["m", 'a "quoted" \\ model\x00', "模型"])
def test_content_events_are_the_chunks_byte_for_byte(model):
    content = ContentEvents(id="chatcmpl-9", created=7, model=model)
    for text in ["Hello", 'say "hi"\n', "\x00", "é猫\t\\", "\u2028 </script>", ""]:
        chunk = chunk_body(
            id="chatcmpl-9", created=7, model=model, delta={"content": text}, finish_reason=None
        )
        assert content.event(text) == sse_event(chunk), text


def test_finish_reasons_and_ids():
    assert [finish_reason_of(r) for r in ("stop_token", "stop_sequence", "length")] == [
        "stop",
        "stop",
        "length",
    ]
    with pytest.raises(ValueError, match="unknown stop reason"):
        finish_reason_of("eos")
    ids = {new_completion_id() for _ in range(3)}
    assert len(ids) == 3 and all(re.fullmatch(r"chatcmpl-[0-9a-f]{32}", i) for i in ids)


def test_api_error_types_and_one_line_messages():
    assert ApiError(500, "boom").type == "server_error"
    assert ApiError(503, "busy").type == "service_unavailable_error"
    assert ApiError(404, "no model").type == "not_found_error"
    assert ApiError(413, "big").type == "invalid_request_error"
    error = ApiError(429, "two\nlines", code="queue_full", error_type="rate_limit_exceeded")
    assert error.body() == {
        "error": {
            "message": "two lines",
            "type": "rate_limit_exceeded",
            "param": None,
            "code": "queue_full",
        }
    }
    assert len(ApiError(400, "x" * 5000).message) == 1000
    assert str(error) == "two lines" and error.status == 429


def test_media_api_error_names_the_part():
    part = MediaPart("image", "file:///etc/passwd", index_in_message=2, message_index=1)
    refused = MediaRefused("image_url 'file:///etc/passwd' is not allowed", 403)
    error = media_api_error(refused, part)
    assert (error.status, error.type, error.param) == (403, "permission_error", part.param)
    assert error.message.startswith("messages[1].content[2]: image_url")


# -- the real openai client -------------------------------------------------------------------


@pytest.fixture
def openai_client():
    """An `openai.OpenAI` whose HTTP goes to `answer(request_body) -> httpx.Response`."""
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    seen = []

    def client(answer):
        def handler(request):
            seen.append(json.loads(request.content))
            return answer(seen[-1])

        transport = httpx.MockTransport(handler)
        return openai.OpenAI(
            api_key="sk-test",
            base_url="http://longvita.test/v1",
            http_client=httpx.Client(transport=transport),
            max_retries=0,
        )

    return client, seen


def test_openai_client_round_trip(openai_client):
    import httpx

    make, seen = openai_client

    def answer(body):
        request = parse(body)
        text = f"{len(request.images)} images, {request.max_frames} frames"
        return httpx.Response(200, json=completion_body(
            id=new_completion_id(), created=1, model=request.model, text=text,
            finish_reason="stop", prompt_tokens=7, completion_tokens=5, cached_tokens=3,
        ))  # fmt: skip

    response = make(answer).chat.completions.create(
        model="long-vita-tiny",
        max_tokens=16,
        temperature=0.0,
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in the image and the video?"},
                    {"type": "image_url", "image_url": {"url": DATA_URL, "detail": "high"}},
                    VIDEO,
                ],
            },
        ],
        extra_body={"max_frames": 256, "fps": 1, "mm_processor_kwargs": {"max_frames": 256}},
    )
    assert response.choices[0].message.content == "1 images, 256 frames"
    assert response.choices[0].finish_reason == "stop"
    assert (response.usage.prompt_tokens, response.usage.total_tokens) == (7, 12)
    assert response.usage.prompt_tokens_details.cached_tokens == 3
    request = parse(seen[0])
    assert request.messages[1]["content"] == (
        "What is in the image and the video?<image>\n<video>\n"
    )
    assert (request.max_tokens, request.temperature, request.fps) == (16, 0.0, 1.0)


def test_openai_client_reassembles_a_stream(openai_client):
    import httpx

    make, seen = openai_client
    pieces = ["A ", "cat ", "on a mat", " 猫"]

    def answer(body):
        request = parse(body)
        assert request.stream and request.include_usage
        head = {"id": "chatcmpl-1", "created": 1, "model": "m"}
        deltas = [{"role": "assistant", "content": pieces[0]}]
        deltas += [{"content": piece} for piece in pieces[1:]]
        events = [chunk_body(**head, delta=d, finish_reason=None) for d in deltas]
        events.append(chunk_body(**head, delta={}, finish_reason="stop"))
        events.append(usage_chunk_body(**head, prompt_tokens=7, completion_tokens=4))
        stream = b"".join(sse_event(event) for event in [*events, "[DONE]"])
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stream)

    chunks = list(
        make(answer).chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(pieces)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 11
    assert len(chunks) == 6


def test_openai_client_raises_our_error(openai_client):
    import httpx
    import openai

    make, _ = openai_client

    def answer(body):
        try:
            parse(body)
        except ApiError as error:
            return httpx.Response(error.status, json=error.body())
        raise AssertionError("the request should be refused")

    with pytest.raises(openai.BadRequestError) as info:
        make(answer).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], n=2
        )
    assert info.value.status_code == 400
    assert info.value.body["param"] == "n"
    assert "n=2: this server returns one choice per request" in info.value.message
