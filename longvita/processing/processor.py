"""The Processor: messages + media in, model inputs out. The one place prompts are built.

Owns: ChatML text -> token ids (the tokenizer splits at `<image>`/`<video>` tags, as the
official code does), planning the media (each image's tile grid, each video's frame indices)
and expanding each tag into its delimiters and placeholders (LONGVITA.md section 2). Planning
reads only file headers: the pixels come later, tile by tile, from the prompt's lazy
`TileSource` (`processing.tiles`), in the order their placeholders appear in the sequence, so a
`<video>` before an `<image>` is handled correctly and a prompt can be measured (and refused)
before any media is decoded. Used alike by inference, training and evaluation (a training
sample decodes its tiles at once). No model, no torch.distributed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from longvita.config import VisionConfig
from longvita.errors import MediaError, PromptError, ReservedTokenError
from longvita.ops.loss import IGNORE_INDEX
from longvita.processing.chat import Messages, build_prompt, training_turns
from longvita.processing.image import (
    DEFAULT_MAX_PIXELS,
    check_pil_image,
    choose_grid,
    image_size,
)
from longvita.processing.tiles import FrameListTiles, ImageTiles, TileSource, VideoFrameTiles
from longvita.processing.tokens import (
    IM_END,
    IM_START,
    SpecialTokenIds,
    load_tokenizer,
    special_token_ids,
)
from longvita.processing.video import (
    DEFAULT_MAX_FPS,
    DEFAULT_MAX_FRAMES,
    frame_dir_indices,
    plan_video,
)

logger = logging.getLogger(__name__)

ImageInput = str | Path | Image.Image
VideoInput = str | Path | Sequence[Image.Image]
"""A video file, a directory of frame files, or the frames themselves (PIL images, taken as
1 fps like a directory's)."""


def media_list(name: str, media: Sequence | None) -> list:
    """`images` or `videos` as a list (None: none); a lone path is refused, not split into
    characters."""
    if media is None:
        return []
    if isinstance(media, str | os.PathLike | bytes | Image.Image) or not isinstance(
        media, Sequence
    ):
        raise ValueError(
            f"{name} must be a list with one entry per tag, got {type(media).__name__}: "
            f"{media!r:.80}"
        )
    return list(media)


MAX_TILES = 12


@dataclass
class ProcessedPrompt:
    """Model inputs for one prompt."""

    input_ids: torch.Tensor
    """[seq] int64, tags expanded."""
    tiles: TileSource
    """The pixel tiles, in the order of their placeholders in `input_ids`, decoded on demand
    (`tiles.get(ids)` -> [n, 3, S, S] float32)."""
    visual_mask: torch.Tensor
    """[seq] bool, True at placeholder positions (tokens_per_tile per tile)."""
    image_grids: list[tuple[int, int]] = field(default_factory=list)
    """(cols, rows) chosen for each image, in tag order."""
    video_frames: list[int] = field(default_factory=list)
    """Frames sampled from each video, in tag order."""
    labels: torch.Tensor | None = None
    """[seq] int64 training labels (token id where supervised, -100 elsewhere), or None for
    an inference prompt. Not shifted: targets[p] = labels[p + 1] is the loss's job."""

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_tiles(self) -> int:
        return self.tiles.num_tiles

    @property
    def how_to_shorten(self) -> str:
        """What would shorten this prompt, for the errors that refuse it: the frames when it
        holds a video, the images when it holds images, else the text."""
        ways = []
        if self.video_frames:
            ways.append("fewer frames (max_frames)")
        if self.image_grids:
            ways.append("fewer or smaller images")
        return " or ".join(ways) or "a shorter text"

    @property
    def pixel_values(self) -> torch.Tensor:
        """Every tile at once, [num_tiles, 3, S, S] float32: decodes all the media, so for
        short prompts, training samples and tests; inference streams `tiles` instead."""
        return self.tiles.get_all()


def image_token_count(
    grid: tuple[int, int], *, tokens_per_tile: int, newline_tokens: int = 1
) -> int:
    """len(image_tokens(grid, ...)) without building it; `newline_tokens` tokens per "\\n"."""
    cols, rows = grid
    count = tokens_per_tile + 2
    if cols * rows > 1:
        count += rows * (newline_tokens + cols * (tokens_per_tile + 2))
    return count


def video_token_count(num_frames: int, *, tokens_per_tile: int) -> int:
    """len(video_tokens(num_frames, ...)) without building it."""
    return num_frames * (tokens_per_tile + 2)


def image_tokens(
    grid: tuple[int, int], *, tokens: SpecialTokenIds, tokens_per_tile: int
) -> list[int]:
    """<img> T x <IMG_CONTEXT> </img> for the first tile (the thumbnail or the only tile); then,
    with more than one tile, per tile row: "\\n", per tile <patch> T x <PATCH_CONTEXT> </patch>."""
    cols, rows = grid
    out = [tokens.img_start] + [tokens.img_context] * tokens_per_tile + [tokens.img_end]
    if cols * rows > 1:
        patch = [tokens.patch_start] + [tokens.patch_context] * tokens_per_tile
        patch.append(tokens.patch_end)
        out += (list(tokens.newline) + patch * cols) * rows
    return out


def video_tokens(num_frames: int, *, tokens: SpecialTokenIds, tokens_per_tile: int) -> list[int]:
    """Per frame <vid> T x <VID_CONTEXT> </vid>."""
    frame = [tokens.vid_start] + [tokens.vid_context] * tokens_per_tile + [tokens.vid_end]
    return frame * num_frames


def expand_tags(
    ids: Sequence[int],
    *,
    tokens: SpecialTokenIds,
    tokens_per_tile: int,
    image_grids: Sequence[tuple[int, int]],
    video_frames: Sequence[int],
    labels: Sequence[int] | None = None,
) -> tuple[list[int], list[int] | None]:
    """Replace the n-th `<image>` / `<video>` tag by the n-th image's / video's tokens.

    With `labels` (one per id), returns the labels expanded alongside: -100 for every token
    that replaces a tag. Returns (ids, labels or None).
    """
    out: list[int] = []
    out_labels: list[int] | None = None if labels is None else []
    images, videos = iter(image_grids), iter(video_frames)
    for i, token in enumerate(ids):
        if token == tokens.image_tag:
            piece = image_tokens(next(images), tokens=tokens, tokens_per_tile=tokens_per_tile)
        elif token == tokens.video_tag:
            piece = video_tokens(next(videos), tokens=tokens, tokens_per_tile=tokens_per_tile)
        else:
            out.append(token)
            if out_labels is not None:
                out_labels.append(labels[i])
            continue
        out += piece
        if out_labels is not None:
            out_labels += [IGNORE_INDEX] * len(piece)
    return out, out_labels


class Processor:
    """Turns chat messages with `<image>`/`<video>` tags and their media into model inputs."""

    def __init__(
        self,
        tokenizer,
        vision: VisionConfig,
        *,
        max_tiles: int = MAX_TILES,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {max_pixels=}")
        self.tokenizer = tokenizer
        self.tokens = special_token_ids(tokenizer)
        self.tile_size = vision.image_size
        self.tokens_per_tile = vision.tokens_per_tile
        self.max_tiles = max_tiles
        self.max_pixels = max_pixels
        """Images and video frames with more pixels are refused from their headers."""

    @classmethod
    def from_pretrained(cls, directory: str | Path, vision: VisionConfig) -> Processor:
        return cls(load_tokenizer(directory), vision)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def __call__(
        self,
        messages: Messages,
        images: Sequence[ImageInput] | None = None,
        videos: Sequence[VideoInput] | None = None,
        *,
        max_frames: int | None = None,
        fps: float | None = None,
    ) -> ProcessedPrompt:
        """An inference prompt: the conversation followed by the assistant generation prompt."""
        ids = self.tokenize(build_prompt(messages))
        return self._expand(ids, None, images, videos, max_frames=max_frames, fps=fps)

    def encode_conversation(
        self,
        messages: Messages,
        images: Sequence[ImageInput] | None = None,
        videos: Sequence[VideoInput] | None = None,
        *,
        max_frames: int | None = None,
        fps: float | None = None,
    ) -> ProcessedPrompt:
        """A training sample: the whole conversation, labels on every `{answer}<|im_end|>\\n`.

        Tokenized as the official training code does (`preprocess` in its dataset_qwen2.py),
        which differs from a prompt's one-call tokenization where a turn's text begins with a
        newline: `<|im_start|>`, the role, `\\n`, the turn's text, `<|im_end|>` and `\\n` are
        tokenized each on its own, so a turn's first token never merges with the header's
        newline; the assistant turns' text, `<|im_end|>` and `\\n` are supervised. A turn
        whose text holds a ChatML token (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`) is
        refused (ReservedTokenError).
        """
        newline, im_start, im_end = (self.tokenize(t) for t in ("\n", IM_START, IM_END))
        ids, labels = [], []
        for turn in training_turns(messages):
            header = im_start + self.tokenize(turn["role"]) + newline
            text = self.tokenize(turn["content"])
            self._check_chat_format(text, turn["role"])
            body = text + im_end + newline
            supervised = body if turn["role"] == "assistant" else [IGNORE_INDEX] * len(body)
            ids += header + body
            labels += [IGNORE_INDEX] * len(header) + supervised
        prompt = self._expand(ids, labels, images, videos, max_frames=max_frames, fps=fps)
        prompt.tiles = prompt.tiles.materialize()  # media errors surface here, not later
        return prompt

    def _expand(
        self,
        ids: list[int],
        labels: list[int] | None,
        images: Sequence[ImageInput] | None,
        videos: Sequence[VideoInput] | None,
        *,
        max_frames: int | None,
        fps: float | None,
    ) -> ProcessedPrompt:
        """Plan the media of the tags in `ids` (headers only) and expand the tags."""
        images, videos = media_list("images", images), media_list("videos", videos)
        self._check_reserved(ids)
        self._check_media_counts(ids, len(images), len(videos))
        segments: list[ImageTiles | VideoFrameTiles | FrameListTiles] = []  # one per tag
        image_grids, video_frames = [], []
        image_iter, video_iter = iter(images), iter(videos)
        for token in ids:
            if token == self.tokens.image_tag:
                segments.append(self._plan_image(next(image_iter)))
                image_grids.append(segments[-1].grid)
            elif token == self.tokens.video_tag:
                segments.append(self._plan_video(next(video_iter), max_frames, fps))
                video_frames.append(segments[-1].num_tiles)
        expanded, expanded_labels = expand_tags(
            ids,
            tokens=self.tokens,
            tokens_per_tile=self.tokens_per_tile,
            image_grids=image_grids,
            video_frames=video_frames,
            labels=labels,
        )
        input_ids = torch.tensor(expanded, dtype=torch.int64)  # [seq]
        visual_mask = torch.isin(input_ids, torch.tensor(self.tokens.context))  # [seq]
        return ProcessedPrompt(
            input_ids=input_ids,
            tiles=TileSource(segments, tile_size=self.tile_size),
            visual_mask=visual_mask,
            image_grids=image_grids,
            video_frames=video_frames,
            labels=None if expanded_labels is None else torch.tensor(expanded_labels),
        )

    def _plan_image(self, image: ImageInput) -> ImageTiles:
        if not isinstance(image, str | os.PathLike | Image.Image):
            raise MediaError(
                f"an image must be a file path or a PIL image, got {type(image).__name__} "
                "(open bytes or arrays with PIL.Image.open or Image.fromarray first)"
            )
        width, height = image_size(image, max_pixels=self.max_pixels)
        grid = choose_grid(width, height, tile_size=self.tile_size, max_tiles=self.max_tiles)
        return ImageTiles(
            image,
            grid,
            tile_size=self.tile_size,
            max_tiles=self.max_tiles,
            max_pixels=self.max_pixels,
            size=(width, height),
        )

    def _plan_video(
        self, video: VideoInput, max_frames: int | None, fps: float | None
    ) -> VideoFrameTiles | FrameListTiles:
        max_frames = DEFAULT_MAX_FRAMES if max_frames is None else max_frames
        max_fps = DEFAULT_MAX_FPS if fps is None else fps
        if not isinstance(video, str | os.PathLike):
            return self._plan_frame_list(video, max_frames, max_fps)
        plan = plan_video(video, max_frames=max_frames, max_fps=max_fps, max_pixels=self.max_pixels)
        return VideoFrameTiles.from_plan(
            video, plan, tile_size=self.tile_size, max_pixels=self.max_pixels
        )

    def _plan_frame_list(self, frames, max_frames: int, max_fps: float) -> FrameListTiles:
        """Frames given in memory: checked, then sampled like a frame directory (1 fps)."""
        what = type(frames).__name__
        if isinstance(frames, list | tuple):
            kinds = sorted({type(frame).__name__ for frame in frames})
            what = f"{what} of {len(frames)} item(s) ({', '.join(kinds) or 'empty'})"
        if not (
            isinstance(frames, list | tuple)
            and frames
            and all(isinstance(frame, Image.Image) for frame in frames)
        ):
            raise MediaError(
                "a video must be a path (a file or a directory of frames) or a non-empty list "
                f"of PIL images, got {what}"
            )
        for k, frame in enumerate(frames):
            check_pil_image(frame, f"video frame {k} (PIL)", self.max_pixels, decode=False)
        indices = frame_dir_indices(len(frames), max_frames=max_frames, max_fps=max_fps)
        return FrameListTiles(frames, indices, tile_size=self.tile_size)

    def _check_reserved(self, ids: Sequence[int]) -> None:
        """ReservedTokenError naming the tokens of `RESERVED_TOKENS` found in the text."""
        names = self._names_of(self.tokens.reserved, ids)
        if names:
            raise ReservedTokenError(
                f"the text contains {names}: tokens the Processor writes around image and video "
                "placeholders, never accepted in messages; remove them (put an <image> or "
                "<video> tag where a medium goes)"
            )

    def _check_chat_format(self, ids: Sequence[int], role: str) -> None:
        """ReservedTokenError when a training turn's text holds a ChatML token."""
        names = self._names_of(self.tokens.chat_format, ids)
        if names:
            raise ReservedTokenError(
                f"the {role} turn's text contains {names}: the chat format's own tokens, which "
                "would end or open a turn mid-text and be learned as such; remove them"
            )

    def _names_of(self, watched: Sequence[int], ids: Sequence[int]) -> str:
        """The `watched` tokens found in `ids`, as "'<a>', '<b>'" ("" when none)."""
        found = sorted(set(watched).intersection(ids))
        return ", ".join(repr(name) for name in self.tokenizer.convert_ids_to_tokens(found))

    def _check_media_counts(self, ids: Sequence[int], num_images: int, num_videos: int) -> None:
        num_image_tags = sum(1 for t in ids if t == self.tokens.image_tag)
        num_video_tags = sum(1 for t in ids if t == self.tokens.video_tag)
        if num_image_tags != num_images:
            raise PromptError(
                f"the prompt has {num_image_tags} <image> tag(s) but {num_images} image(s) were "
                "given; put one <image> tag per image, in order"
            )
        if num_video_tags != num_videos:
            raise PromptError(
                f"the prompt has {num_video_tags} <video> tag(s) but {num_videos} video(s) were "
                "given; put one <video> tag per video, in order"
            )
