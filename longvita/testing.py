"""Stand-ins for real assets and independent oracles, for tests, benchmarks and the demo.

Machines that cannot download anything still need a tokenizer, checkpoints, images, videos and
training data: this module makes tiny, self-made ones (a real byte-level BPE Qwen2 tokenizer
trained on a few sentences, with Qwen's three special tokens and without the Long-VITA ones, so
the loader's "add the missing tokens" path runs every time; random checkpoints in the official
layout; synthetic images, videos and data files in the official formats). It also holds the
slow, obviously-correct definitions that the fast code is checked against
(`reference_attention`). Nothing in the library's own paths calls it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from longvita.config import LongVITAConfig, tiny
from longvita.model.checkpoint import save_model
from longvita.model.long_vita import LongVITAForCausalLM
from longvita.ops.attention_kernels import math_forward
from longvita.processing.tokens import train_bpe_tokenizer

# -- tokenizer, models, checkpoints -----------------------------------------------------------

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is in this image? Describe the video in detail.",
    "A red square, a blue circle and a green line on a white background.",
    "Answer the question using a single word or phrase.",
]


def write_tiny_tokenizer(directory: str | Path, *, vocab_size: int = 320) -> Path:
    """A Qwen2Tokenizer directory trained on a few sentences: byte-level BPE + <|endoftext|>,
    <|im_start|>, <|im_end|> (without the Long-VITA tokens: the loader adds them)."""
    return train_bpe_tokenizer(directory, _CORPUS, vocab_size=vocab_size)


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


# -- training data in the official format ----------------------------------------------------


def conversation(
    question: str,
    answer: str | Sequence[str],
    *,
    images: Sequence[str] = (),
    videos: Sequence[str] = (),
    sharegpt: bool = False,
    system: str | None = None,
) -> dict:
    """One record. Several answers make a multi-turn conversation (the question repeated)."""
    answers = [answer] if isinstance(answer, str) else list(answer)
    turns = [("system", system)] if system is not None else []
    for i, reply in enumerate(answers):
        turns += [("user", question if i == 0 else f"and {i}?"), ("assistant", reply)]
    if sharegpt:
        names = {"user": "human", "assistant": "gpt", "system": "system"}
        record: dict = {"conversations": [{"from": names[r], "value": c} for r, c in turns]}
    else:
        record = {"messages": [{"role": r, "content": c} for r, c in turns]}
    if images:
        record["images"] = list(images)
    if videos:
        record["videos"] = list(videos)
    return record


def write_jsonl(path: str | os.PathLike, records: Iterable[object | str]) -> Path:
    """One record per line; a str is written as is (to plant a malformed line)."""
    path = Path(path)
    with open(path, "w") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path


def write_json_list(path: str | os.PathLike, records: Iterable[object], *, indent=2) -> Path:
    path = Path(path)
    path.write_text(json.dumps(list(records), indent=indent))
    return path


def write_mixture(path: str | os.PathLike, groups: Mapping[str, Mapping]) -> Path:
    """A mixture YAML: `dataset: {name: {ratio, num, data_paths}}`."""
    path = Path(path)
    path.write_text(yaml.safe_dump({"dataset": {k: dict(v) for k, v in groups.items()}}))
    return path


# -- oracles ----------------------------------------------------------------------------------


def segment_ids(cu_seqlens: torch.Tensor | Sequence[int], start: int, end: int) -> torch.Tensor:
    """Sample index of each position start..end-1 of a packed sequence -> int64 [end - start]."""
    bounds = torch.as_tensor(cu_seqlens, dtype=torch.int64, device="cpu")
    positions = torch.arange(start, end, dtype=torch.int64)  # [end - start]
    return torch.searchsorted(bounds[1:], positions, right=True)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    q_segment: torch.Tensor | None = None,
    k_segment: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention by its definition, in fp32 with an explicit [q_len, kv_len] mask.

    Query i sees key j iff k_index[j] <= q_index[i] and (when segments are given) they share a
    segment. q: [batch, hq, q_len, d]; k, v: [batch, hkv, kv_len, d]. Returns out in q's dtype
    and lse float32 [batch, hq, q_len]; autograd works, also for rows that see nothing.
    """
    visible = k_index[None, :] <= q_index[:, None]  # [q_len, kv_len]
    if q_segment is not None and k_segment is not None:
        visible = visible & (q_segment[:, None] == k_segment[None, :])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return math_forward(q, k, v, visible, False, scale)


class LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op produces inside it
    (`with LargestOutput() as seen: ...; seen.max_numel`): proves a bound on working memory."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.max_numel = max(self.max_numel, leaf.numel())
        return out
