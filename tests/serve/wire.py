"""What the wire-format tests share: the control tokens a server escapes, and parsing with them."""

from __future__ import annotations

from longvita.serve.protocol import ChatRequest, parse_chat_request

CONTROL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<image>",
    "<video>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
)

DATA_URL = "data:image/png;base64," + "iVBORw0KGgo" * 2000
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}
VIDEO = {"type": "video_url", "video_url": {"url": "file:///data/clip.mp4"}}


def user(content: object) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": content}]}


def parse(body: object, **options) -> ChatRequest:
    return parse_chat_request(body, control_tokens=CONTROL_TOKENS, **options)
