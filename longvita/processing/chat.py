"""ChatML prompts: messages in, prompt text out (no BOS, no default system turn).

    <|im_start|>system\n{system}<|im_end|>\n      (only when the caller gives one)
    <|im_start|>user\n{content}<|im_end|>\n
    <|im_start|>assistant\n                        (the generation prompt)

Owns message validation and role names (user/human, assistant/gpt, system). Knows nothing of
tokens or media: `<image>` and `<video>` tags stay in the text for the Processor to expand.
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping, Sequence

ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
}

Messages = str | Sequence[Mapping[str, str]]


def normalize_messages(messages: Messages) -> list[dict[str, str]]:
    """A plain string is one user turn; roles are mapped to user/assistant/system."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not messages:
        raise ValueError("messages is empty: give a string or at least one {role, content} turn")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "content" not in message:
            raise ValueError(
                f"message {i} must be a mapping with 'role' and 'content': {_short(message)}"
            )
        role = ROLE_ALIASES.get(str(message.get("role", "")).lower())
        if role is None:
            raise ValueError(
                f"message {i} has role {_short(message.get('role'))}; "
                f"expected one of {sorted(ROLE_ALIASES)}"
            )
        if not isinstance(message["content"], str):
            content = _short(message["content"])
            raise ValueError(f"message {i}: content must be a string, got {content}")
        check_text(message["content"], f"message {i} content")
        out.append({"role": role, "content": message["content"]})
    return out


def _short(value: object) -> str:
    """A bounded repr for error messages (a record may hold anything, nested deep)."""
    return _REPR.repr(value)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80


def check_text(text: str, what: str) -> None:
    """ValueError unless `text` is valid Unicode: no lone surrogate, which is what invalid UTF-8
    bytes (a command-line argument, a JSON escape like "\\udce9") decode to."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start : err.end]
        raise ValueError(
            f"{what} is not valid Unicode text: {bad!r} at character {err.start} is a lone "
            "surrogate (invalid UTF-8 input?)"
        ) from None


def render_turn(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


GENERATION_PROMPT = "<|im_start|>assistant\n"


def build_prompt(messages: Messages, *, add_generation_prompt: bool = True) -> str:
    """The ChatML text of `messages`, ending with the assistant generation prompt."""
    turns = normalize_messages(messages)
    text = "".join(render_turn(t["role"], t["content"]) for t in turns)
    return text + GENERATION_PROMPT if add_generation_prompt else text


def training_turns(messages: Messages) -> list[dict[str, str]]:
    """The turns of a conversation to train on (`normalize_messages`); ValueError when none is
    an assistant's: there would be nothing to learn from."""
    turns = normalize_messages(messages)
    if not any(turn["role"] == "assistant" for turn in turns):
        raise ValueError("the conversation has no assistant turn: nothing to supervise")
    return turns
