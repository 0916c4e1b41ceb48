"""Tiny, self-made stand-ins for real assets: a byte-level BPE tokenizer, a random checkpoint in
the official layout, a synthetic image and video.

Used by the tests and `longvita demo`, on machines that cannot download anything. The tokenizer
is a real Qwen2 tokenizer (vocab.json + merges.txt) trained on a few sentences, with Qwen's
three special tokens and without the Long-VITA ones, so the loader's "add the missing tokens"
path runs every time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from longvita.config import LongVITAConfig, tiny
from longvita.model.checkpoint import save_model
from longvita.model.long_vita import LongVITAForCausalLM

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is in this image? Describe the video in detail.",
    "A red square, a blue circle and a green line on a white background.",
    "Answer the question using a single word or phrase.",
]
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def write_tiny_tokenizer(directory: str | Path, *, vocab_size: int = 320) -> Path:
    """A Qwen2Tokenizer directory: byte-level BPE + <|endoftext|>, <|im_start|>, <|im_end|>."""
    from tokenizers import ByteLevelBPETokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_CORPUS, vocab_size=vocab_size, min_frequency=1, show_progress=False)
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
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "model_max_length": 131072,
        "split_special_tokens": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return directory


def random_model(config: LongVITAConfig | None = None, *, seed: int = 0) -> LongVITAForCausalLM:
    """A randomly initialised model (tiny by default), deterministic for a seed."""
    torch.manual_seed(seed)
    model = LongVITAForCausalLM(config or tiny())
    model.model.init_weights()
    model.model.vision_model.reset_parameters()
    return model.eval()


def make_tiny_checkpoint(
    directory: str | Path,
    *,
    config: LongVITAConfig | None = None,
    seed: int = 0,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write a random checkpoint in the official layout, with the tiny tokenizer."""
    directory = Path(directory)
    model = random_model(config, seed=seed)
    kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    save_model(model, directory, **kwargs)
    write_tiny_tokenizer(directory)
    return directory


def make_image(path: str | Path, size: tuple[int, int] = (640, 360), *, seed: int = 0) -> Path:
    """A gradient with a few coloured shapes, saved to `path` (format from the suffix)."""
    width, height = size
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    pixels = np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.rectangle((x0, y0, x0 + width // 4, y0 + height // 4), fill=colour)
    path = Path(path)
    image.save(path)
    return path


def make_video(
    path: str | Path, *, num_frames: int = 16, fps: int = 4, size: tuple[int, int] = (96, 64)
) -> Path:
    """An MPEG-4 video whose frame k is a solid grey of level 8*k (mod 256), with a moving bar."""
    import av

    width, height = size

    def frames():
        for k in range(num_frames):
            pixels = np.full((height, width, 3), (8 * k) % 256, dtype=np.uint8)
            bar = (k * 4) % max(width - 8, 1)
            pixels[:, bar : bar + 8] = (255, 64, 0)
            yield av.VideoFrame.from_ndarray(pixels, format="rgb24")

    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        encode_frames(container, stream, frames())
    return path


def encode_frames(container, stream, frames: Iterable) -> None:
    """Encode PyAV `frames` into `stream` of the open output `container`, mux every packet, and
    flush the encoder at the end (the last packets come out only then)."""
    for frame in frames:
        container.mux(stream.encode(frame))
    container.mux(stream.encode())
