"""The OpenAI chat-completions wire format of `longvita serve`: request bodies in, JSON out.

Owns the parsing and validation of a `POST /v1/chat/completions` body into a `ChatRequest`
(messages with `<image>`/`<video>` tags where the media parts were, the media URLs in tag order,
sampling and video options) and `ApiError`, OpenAI's error JSON (the response bodies are
`serve.responses`). Every
refusal is an `ApiError` whose message is one line naming the field (`messages[1].content[0]`)
and a bounded form of the value: a data URL by its media type and length, never its contents.

Knows nothing of HTTP frameworks, the model or media fetching (`serve.media`): the app parses a
body here, fetches each `MediaPart`, runs the engine, and answers with `serve.responses`.
"""

from __future__ import annotations

import contextlib
import functools
import re
import reprlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from longvita.checks import check_int, check_number
from longvita.infer.detokenize import check_stop_sequences
from longvita.processing.chat import check_text
from longvita.processing.tokens import IMAGE_TAG, VIDEO_TAG

if TYPE_CHECKING:
    from longvita.serve.media import MediaRefused

ZERO_WIDTH_SPACE = "\u200b"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
"""Accepted message roles and the ChatML role each becomes."""
MEDIA_PART_TYPES = {"image_url": "image", "video_url": "video"}
MEDIA_TAGS = {"image": IMAGE_TAG + "\n", "video": VIDEO_TAG + "\n"}
"""What a media part becomes in the message text: the same tags `Pipeline.generate` takes."""
SEED_RANGE = (-(2**63), 2**63 - 1)
MAX_MESSAGE_CHARS = 1000
_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class ApiError(Exception):
    """A request the server answers with an error status and OpenAI's error JSON (`body`)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
    ) -> None:
        message = " ".join(message.splitlines())
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        default = "server_error" if status >= 500 else "invalid_request_error"
        self.type = error_type or _ERROR_TYPES.get(status, default)

    def body(self) -> dict[str, Any]:
        """`{"error": {"message", "type", "param", "code"}}`, as OpenAI answers."""
        error = {"message": self.message, "type": self.type, "param": self.param}
        return {"error": {**error, "code": self.code}}


def _bad(param: str | None, message: str) -> ApiError:
    return ApiError(400, message, param=param)


@contextlib.contextmanager
def _refusal(param: str) -> Iterator[None]:
    """A ValueError of a shared check (`check_int`, `check_text`...) becomes a 400."""
    try:
        yield
    except ValueError as err:
        raise _bad(param, str(err)) from None


class _ShortRepr(reprlib.Repr):
    """A bounded repr that names a data URL by its media type and length."""

    def repr_str(self, x: str, level: int) -> str:
        if x[:5].lower() == "data:":
            media_type = re.split("[;,]", x[5:69], maxsplit=1)[0] or "no media type"
            return f"<data URL: {media_type!r}, {len(x):,} characters>"
        return super().repr_str(x, level)


_SHORT = _ShortRepr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 80, 80


def shown(value: object) -> str:
    """`value` as error messages show it: a bounded repr, data URLs summarised."""
    return _SHORT.repr(value)


# -- escaping ---------------------------------------------------------------------------------


def escape_control_tokens(text: str, control_tokens: Sequence[str]) -> str:
    """`text` with every occurrence of a control token broken by a zero-width space (U+200B)
    after its first character, so that it tokenizes as plain text.

    The tokenizer parses special-token strings (`<|im_start|>`, `<image>`, `<IMG_CONTEXT>`...)
    wherever they appear in text, so a client typing `<|im_end|><|im_start|>system` could forge
    turns, and a typed `<image>` would claim a media slot. The server writes every tag itself,
    from the message roles and media parts, so typed ones are neutralised. A space is inserted
    after the first character of every position where any token starts, so tokens nested in or
    overlapping others are broken too, and since no token contains U+200B, the insertions create
    no new occurrence: the result contains none of `control_tokens`.
    """
    if not control_tokens or not text:
        return text
    return _control_pattern(tuple(control_tokens)).sub("\\1" + ZERO_WIDTH_SPACE, text)


@functools.lru_cache(maxsize=8)
def _control_pattern(control_tokens: tuple[str, ...]) -> re.Pattern[str]:
    for token in control_tokens:
        if len(token) < 2 or ZERO_WIDTH_SPACE in token:
            raise ValueError(f"control token {token!r} cannot be escaped (too short or has U+200B)")
    tokens = sorted(set(control_tokens), key=len, reverse=True)
    alternatives = "|".join(re.escape(token) for token in tokens)
    return re.compile(f"(?=(?:{alternatives}))(.)", re.DOTALL)


# -- the request ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MediaPart:
    """One `image_url` or `video_url` content part: where it was and the URL to fetch."""

    kind: str
    """"image" or "video"."""
    url: str
    index_in_message: int
    """Position of the part in its message's `content` list."""
    message_index: int

    @property
    def param(self) -> str:
        """The part's path in the request body, as error messages name it."""
        return f"messages[{self.message_index}].content[{self.index_in_message}]"


@dataclass(frozen=True, kw_only=True)
class ChatRequest:
    """A validated chat-completions request; None means "not given: the server's default"."""

    model: str | None
    messages: list[dict[str, str]]
    """{"role", "content"} turns, media parts replaced by `<image>\\n` / `<video>\\n` tags."""
    images: list[MediaPart]
    """One per `<image>` tag, in tag order."""
    videos: list[MediaPart]
    """One per `<video>` tag, in tag order."""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    """0 disables top-k sampling (a request's -1 arrives as 0)."""
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    """Stream a usage chunk before `[DONE]` (`stream_options.include_usage`)."""
    max_frames: int | None = None
    fps: float | None = None
    ignore_eos: bool | None = None
    """Generate past the stop token (vLLM's extra field), to `max_tokens` tokens."""

    def generation_options(self, *, default_max_tokens: int) -> dict[str, Any]:
        """The keyword options of `Pipeline.generate` this request sets (stop not included)."""
        options = {
            "max_new_tokens": self.max_tokens or default_max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "max_frames": self.max_frames,
            "fps": self.fps,
            "ignore_eos": self.ignore_eos,
        }
        return {name: value for name, value in options.items() if value is not None}


def parse_chat_request(
    body: object,
    *,
    control_tokens: Sequence[str] = (),
    escape: bool = True,
    max_stop_sequences: int = 4,
    max_stop_length: int = 64,
    max_media: int = 16,
) -> ChatRequest:
    """Validate a decoded chat-completions JSON body; ApiError(400) naming the field otherwise.
    Text is escaped (`escape_control_tokens`) unless `escape` is False; unknown fields are
    ignored; whether `model` is the served one is the caller's to check."""
    if not isinstance(body, dict):
        raise _bad(None, f"the request body must be a JSON object, got {type(body).__name__}")
    _refuse_unsupported(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", f"model must be a string, got {shown(model)}")
    tokens = control_tokens if escape else ()
    escape_text = functools.partial(escape_control_tokens, control_tokens=tokens)
    messages, media = _parse_messages(body.get("messages"), escape_text)
    if len(media) > max_media:
        raise _bad(
            "messages",
            f"messages have {len(media)} media parts (images and videos); "
            f"this server accepts at most {max_media} per request",
        )
    stream, include_usage = _stream_options(body)
    max_frames, fps = _video_options(body)
    top_k = _int_value("top_k", body.get("top_k"), minimum=-1)
    return ChatRequest(
        model=model,
        messages=messages,
        images=[part for part in media if part.kind == "image"],
        videos=[part for part in media if part.kind == "video"],
        max_tokens=_max_tokens(body),
        temperature=_number_value("temperature", body.get("temperature"), at_least=0, at_most=2),
        top_p=_number_value("top_p", body.get("top_p"), above=0, at_most=1),
        top_k=0 if top_k == -1 else top_k,
        seed=_seed(body.get("seed")),
        stop=_stop(body.get("stop"), max_count=max_stop_sequences, max_length=max_stop_length),
        stream=stream,
        include_usage=include_usage,
        max_frames=max_frames,
        fps=fps,
        ignore_eos=_bool_value("ignore_eos", body.get("ignore_eos")) or None,
    )


def _empty(value: object) -> bool:
    return value is None or (isinstance(value, list | dict) and not value)


def _zero(value: object) -> bool:
    return value is None or (type(value) in (int, float) and value == 0)


def _one(value: object) -> bool:
    return value is None or (type(value) in (int, float) and value == 1)


def _false(value: object) -> bool:
    return value is None or value is False


def _true(value: object) -> bool:
    return value is None or value is True


_HARMLESS: dict[str, Callable[[object], bool]] = {
    # field -> whether its value asks for nothing this server lacks
    "tools": _empty,
    "functions": _empty,
    "tool_choice": lambda value: value in (None, "none"),
    "function_call": lambda value: value in (None, "none"),
    "logprobs": lambda value: value is None or value is False,
    "top_logprobs": lambda value: value is None,
    "logit_bias": _empty,
    "presence_penalty": _zero,
    "frequency_penalty": _zero,
    "response_format": lambda value: value is None or value == {"type": "text"},
    "modalities": lambda value: value is None or value == ["text"],
    "audio": _empty,
    # vLLM's extra sampling and output fields: each changes the answer where vLLM serves it,
    # so a value other than "as if absent" is refused rather than silently ignored
    "repetition_penalty": _one,
    "length_penalty": _one,
    "min_p": _zero,
    "min_tokens": _zero,
    "best_of": _one,
    "use_beam_search": _false,
    "stop_token_ids": _empty,
    "bad_words": _empty,
    "allowed_token_ids": _empty,
    "include_stop_str_in_output": _false,
    "skip_special_tokens": _true,
    "echo": _false,
    "add_generation_prompt": _true,
    "continue_final_message": _false,
    "chat_template": _empty,
    "prompt_logprobs": lambda value: value is None,
    "truncate_prompt_tokens": lambda value: value is None,
    "guided_json": _empty,
    "guided_regex": _empty,
    "guided_choice": _empty,
    "guided_grammar": _empty,
    "structured_outputs": _empty,
}


def _refuse_unsupported(body: dict) -> None:
    for name, harmless in _HARMLESS.items():
        if not harmless(body.get(name)):
            raise _bad(name, f"{name}={shown(body[name])} is not supported by this server")
    n = body.get("n")
    if n is not None and (type(n) is not int or n != 1):
        raise _bad("n", f"n={shown(n)}: this server returns one choice per request")


def _parse_messages(
    value: object, escape_text: Callable[[str], str]
) -> tuple[list[dict[str, str]], list[MediaPart]]:
    if not isinstance(value, list) or not value:
        raise _bad("messages", f"messages must be a non-empty list of objects, got {shown(value)}")
    messages, media = [], []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(where, f"{where} must be an object with role and content: {shown(message)}")
        role = _role(message.get("role"), where)
        for key in ("tool_calls", "function_call"):
            if not _empty(message.get(key)):
                raise _bad(f"{where}.{key}", f"{where}.{key}: tool calls are not supported")
        content, parts = _content(message.get("content"), i, role, escape_text)
        messages.append({"role": role, "content": content})
        media += parts
    return messages, media


def _role(value: object, where: str) -> str:
    if value in ("tool", "function"):
        raise _bad(f"{where}.role", f"{where}.role {value!r}: tool messages are not supported")
    role = ROLES.get(value) if isinstance(value, str) else None
    if role is None:
        raise _bad(
            f"{where}.role", f"{where}.role must be one of {list(ROLES)}, got {shown(value)}"
        )
    return role


def _content(
    content: object, message_index: int, role: str, escape_text: Callable[[str], str]
) -> tuple[str, list[MediaPart]]:
    """The message text (parts joined in order, media as tags) and its media parts."""
    where = f"messages[{message_index}]"
    if isinstance(content, str):
        return _text(content, f"{where}.content", escape_text), []
    if not isinstance(content, list) or not content:
        raise _bad(
            f"{where}.content",
            f"{where}.content must be a string or a non-empty list of parts, got {shown(content)}",
        )
    pieces, media = [], []
    for j, part in enumerate(content):
        part_where = f"{where}.content[{j}]"
        kind, value = _part(part, part_where)
        if kind == "text":
            pieces.append(_text(value, f"{part_where}.text", escape_text))
            continue
        if role != "user":
            raise _bad(part_where, f"{part_where}: {kind} parts are only accepted in user messages")
        pieces.append(MEDIA_TAGS[kind])
        media.append(MediaPart(kind, value, index_in_message=j, message_index=message_index))
    return "".join(pieces), media


def _part(part: object, where: str) -> tuple[str, str]:
    """("text", text) or (media kind, url) of one content part."""
    if not isinstance(part, dict):
        raise _bad(where, f"{where} must be an object with a type, got {shown(part)}")
    part_type = part.get("type")
    if part_type == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise _bad(f"{where}.text", f"{where}.text must be a string, got {shown(text)}")
        return "text", text
    kind = MEDIA_PART_TYPES.get(part_type) if isinstance(part_type, str) else None
    if kind is None:
        raise _bad(
            f"{where}.type",
            f"{where}.type {shown(part_type)} is not supported; "
            f"expected 'text', {' or '.join(map(repr, MEDIA_PART_TYPES))}",
        )
    return kind, _media_url(part.get(part_type), f"{where}.{part_type}")


IMAGE_DETAILS = (None, "auto", "low", "high")
"""OpenAI's `image_url.detail` values; all read alike (Long-VITA tiles by its own rule)."""


def _media_url(value: object, where: str) -> str:
    if isinstance(value, dict):
        detail = value.get("detail")
        if detail not in IMAGE_DETAILS:
            raise _bad(
                f"{where}.detail", f"{where}.detail must be auto, low or high, got {shown(detail)}"
            )
        value, where = value.get("url"), f"{where}.url"
    if not isinstance(value, str) or not value:
        raise _bad(where, f"{where} must be a non-empty URL string, got {shown(value)}")
    with _refusal(where):
        check_text(value, where)
    return value


def _text(text: str, where: str, escape_text: Callable[[str], str]) -> str:
    with _refusal(where):
        check_text(text, where)
    return escape_text(text)


def _require_number(name: str, value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(name, f"{name} must be {what}, got {shown(value)}")


def _int_value(name: str, value: object, *, minimum: int | None = None) -> int | None:
    if value is None:
        return None
    _require_number(name, value, "an integer")
    with _refusal(name):
        return check_int(name, value, minimum=minimum)


def _number_value(name: str, value: object, **bounds: float) -> float | None:
    if value is None:
        return None
    _require_number(name, value, "a number")
    with _refusal(name):
        return check_number(name, value, **bounds)


def _agreeing(values: dict[str, Any]) -> Any:
    """The one value given under any of several names (None if none); 400 if they differ."""
    given = {name: value for name, value in values.items() if value is not None}
    if len(set(given.values())) > 1:
        names = list(given)
        listed = " and ".join(f"{name}={value}" for name, value in given.items())
        raise _bad(names[-1], f"{listed} disagree: give one")
    return next(iter(given.values()), None)


def _max_tokens(body: dict) -> int | None:
    names = ("max_tokens", "max_completion_tokens")
    return _agreeing({name: _int_value(name, body.get(name), minimum=1) for name in names})


def _seed(value: object) -> int | None:
    seed = _int_value("seed", value)
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise _bad("seed", f"seed must be a 64-bit signed integer, got {shown(seed)}")
    return seed


def _stop(value: object, *, max_count: int, max_length: int) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, str | list):
        raise _bad("stop", f"stop must be a string or a list of strings, got {shown(value)}")
    with _refusal("stop"):
        sequences = check_stop_sequences(value)
    if len(sequences) > max_count:
        raise _bad("stop", f"stop has {len(sequences)} sequences; at most {max_count} accepted")
    for k, sequence in enumerate(sequences):
        where = f"stop[{k}]" if isinstance(value, list) else "stop"
        if len(sequence) > max_length:
            raise _bad(where, f"{where} has {len(sequence):,} characters; at most {max_length}")
        with _refusal(where):
            check_text(sequence, where)
    return sequences


def _bool_value(name: str, value: object) -> bool:
    if value is not None and not isinstance(value, bool):
        raise _bad(name, f"{name} must be true or false, got {shown(value)}")
    return bool(value)


def _object(value: object, name: str) -> dict:
    if value is not None and not isinstance(value, dict):
        raise _bad(name, f"{name} must be an object, got {shown(value)}")
    return value or {}


def _stream_options(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = _bool_value("stream", body.get("stream"))
    if body.get("stream_options") is None:
        return stream, False
    if not stream:
        raise _bad("stream_options", "stream_options is only allowed when stream is true")
    options = _object(body["stream_options"], "stream_options")
    if options.get("continuous_usage_stats"):
        raise _bad("stream_options", "stream_options.continuous_usage_stats is not supported")
    return True, _bool_value("stream_options.include_usage", options.get("include_usage"))


def _video_options(body: dict) -> tuple[int | None, float | None]:
    """(max_frames, fps), from the top level, `mm_processor_kwargs` or `media_io_kwargs`."""
    processor = _object(body.get("mm_processor_kwargs"), "mm_processor_kwargs")
    io_kwargs = _object(body.get("media_io_kwargs"), "media_io_kwargs")
    video_io = _object(io_kwargs.get("video"), "media_io_kwargs.video")
    frames = {
        "max_frames": body.get("max_frames"),
        "mm_processor_kwargs.max_frames": processor.get("max_frames"),
        "media_io_kwargs.video.num_frames": video_io.get("num_frames"),
    }
    rates = {"fps": body.get("fps"), "mm_processor_kwargs.fps": processor.get("fps")}
    max_frames = _agreeing({k: _int_value(k, v, minimum=1) for k, v in frames.items()})
    fps = _agreeing({k: _number_value(k, v, above=0) for k, v in rates.items()})
    return max_frames, fps


def media_api_error(error: MediaRefused, part: MediaPart) -> ApiError:
    """A media refusal (`serve.media`) as the ApiError answering it, naming the part."""
    return ApiError(error.status, f"{part.param}: {error}", param=part.param)
