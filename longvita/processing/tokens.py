"""The tokenizer and Long-VITA's special tokens.

Owns loading the Qwen2 tokenizer of a checkpoint directory (with transformers), adding any of the
17 Long-VITA tokens it lacks, in the official order, saving it in the official layout, and
resolving the ids the rest of the code needs. Every id is read from the tokenizer, never
hard-coded, so tiny test tokenizers work too.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from longvita.errors import CheckpointError

logger = logging.getLogger(__name__)

IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"

# The official order: a tokenizer without them gets ids 151665..151681 on Qwen2.5.
LONG_VITA_TOKENS = (
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<vid>",
    "</vid>",
    "<VID_CONTEXT>",
    "<patch>",
    "</patch>",
    "<PATCH_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    IMAGE_TAG,
    VIDEO_TAG,
)
RESERVED_TOKENS = LONG_VITA_TOKENS[:9]
"""What tag expansion writes around and into visual slots; never accepted in text."""
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"


@dataclass(frozen=True, kw_only=True)
class SpecialTokenIds:
    """Ids of the tokens that prompt building, tag expansion and decoding rely on."""

    im_start: int
    im_end: int
    pad: int
    img_start: int
    img_end: int
    img_context: int
    vid_start: int
    vid_end: int
    vid_context: int
    patch_start: int
    patch_end: int
    patch_context: int
    image_tag: int
    video_tag: int
    newline: tuple[int, ...]
    """The token(s) of "\\n", written between tile rows."""

    @property
    def stop(self) -> tuple[int, ...]:
        """Generation stops at either of these (not included in the output)."""
        return (self.im_end, self.pad)

    @property
    def chat_format(self) -> tuple[int, ...]:
        """Ids that open and close ChatML turns and pad: a training turn's text holding one
        would end or open a turn mid-text, and teach the model to write it."""
        return (self.im_start, self.im_end, self.pad)

    @property
    def context(self) -> tuple[int, ...]:
        """Placeholder ids whose embeddings are overwritten by visual features."""
        return (self.img_context, self.patch_context, self.vid_context)

    @property
    def reserved(self) -> tuple[int, ...]:
        """Ids only tag expansion may write (`RESERVED_TOKENS`): the placeholders and their
        delimiters. In text they would desynchronise placeholders and tiles."""
        return (
            self.img_start,
            self.img_end,
            self.img_context,
            self.vid_start,
            self.vid_end,
            self.vid_context,
            self.patch_start,
            self.patch_end,
            self.patch_context,
        )


def add_long_vita_tokens(tokenizer) -> list[str]:
    """Add the Long-VITA tokens the tokenizer lacks, in the official order; returns them."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in LONG_VITA_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
        logger.info("added %d Long-VITA tokens to the tokenizer: %s", len(missing), missing)
    return missing


def load_tokenizer(directory: str | Path):
    """Load the checkpoint's Qwen2 tokenizer and complete its Long-VITA tokens.

    The Qwen2 class is used directly: AutoTokenizer would consult config.json, whose
    `model_type: long_vita` transformers does not know.
    """
    from transformers import Qwen2TokenizerFast

    directory = Path(directory)
    found = [n for n in ("tokenizer.json", "vocab.json") if (directory / n).is_file()]
    if not found:
        raise CheckpointError(
            f"{directory} has no tokenizer files (tokenizer.json or vocab.json + merges.txt)"
        )
    try:
        tokenizer = Qwen2TokenizerFast.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"cannot load the tokenizer in {directory}: {err}") from err
    add_long_vita_tokens(tokenizer)
    return tokenizer


V5_ONLY_CONFIG_KEYS = ("backend", "is_local", "local_files_only")
"""What transformers 5 writes into tokenizer_config.json that no tokenizer needs to load."""


def save_tokenizer(tokenizer, directory: str | Path) -> None:
    """Write the tokenizer in the official checkpoint's layout, which both transformers 4 (the
    official code's) and 5 load: tokenizer.json, the slow tokenizer's vocab.json and
    merges.txt, and a tokenizer_config.json with `additional_special_tokens`,
    `added_tokens_decoder` and `chat_template` (transformers 5's own save lists the special
    tokens as `extra_special_tokens`, which version 4 takes for a mapping and fails on)."""
    directory = Path(directory)
    tokenizer.save_pretrained(str(directory))
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        config["additional_special_tokens"] = extra
    elif extra:
        config["extra_special_tokens"] = extra  # a mapping: both versions read it
    for key in V5_ONLY_CONFIG_KEYS:
        config.pop(key, None)
    template = directory / "chat_template.jinja"
    if template.is_file():
        config["chat_template"] = template.read_text(encoding="utf-8")
    config["added_tokens_decoder"] = {
        str(index): {
            "content": token.content, "lstrip": token.lstrip, "normalized": token.normalized,
            "rstrip": token.rstrip, "single_word": token.single_word, "special": token.special,
        }
        for index, token in sorted(tokenizer.added_tokens_decoder.items())
    }  # fmt: skip
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    model = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    vocab = json.dumps(model["vocab"], ensure_ascii=False)
    (directory / "vocab.json").write_text(vocab, encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    text = "#version: 0.2\n" + "".join(f"{merge}\n" for merge in merges)
    (directory / "merges.txt").write_text(text, encoding="utf-8")


def special_token_ids(tokenizer) -> SpecialTokenIds:
    """Resolve every special id; a tokenizer lacking one raises CheckpointError naming it."""

    def one(token: str) -> int:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise CheckpointError(f"the tokenizer does not hold {token!r} as a single token")
        return ids[0]

    return SpecialTokenIds(
        im_start=one(IM_START),
        im_end=one(IM_END),
        pad=one(PAD_TOKEN),
        img_start=one("<img>"),
        img_end=one("</img>"),
        img_context=one("<IMG_CONTEXT>"),
        vid_start=one("<vid>"),
        vid_end=one("</vid>"),
        vid_context=one("<VID_CONTEXT>"),
        patch_start=one("<patch>"),
        patch_end=one("</patch>"),
        patch_context=one("<PATCH_CONTEXT>"),
        image_tag=one(IMAGE_TAG),
        video_tag=one(VIDEO_TAG),
        newline=tuple(tokenizer.encode("\n", add_special_tokens=False)),
    )


QWEN_SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)
"""Qwen's own special tokens, ids 151643-151645 in Qwen2.5 (here: right after the BPE)."""


def train_bpe_tokenizer(directory: str | Path, corpus: list[str], *, vocab_size: int) -> Path:
    """A Qwen2Tokenizer directory (vocab.json, merges.txt, tokenizer_config.json): byte-level
    BPE trained on `corpus`, then Qwen's three special tokens; without the Long-VITA ones, which
    `load_tokenizer` adds. For small models of our own (the demo, tests): a real Qwen2.5
    tokenizer has 151,643 merges-built tokens."""
    from tokenizers import ByteLevelBPETokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=1, show_progress=False)
    bpe.save_model(str(directory))
    first_special = len(json.loads((directory / "vocab.json").read_text()))
    added = {
        str(first_special + i): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, token in enumerate(QWEN_SPECIAL_TOKENS)
    }
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "errors": "replace",
        "model_max_length": 131072,
        "split_special_tokens": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return directory
