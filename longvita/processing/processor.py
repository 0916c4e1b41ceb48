"""The Processor: messages + media in, model inputs out. The one place prompts are built.

Owns: ChatML text -> token ids (the tokenizer splits at `<image>`/`<video>` tags, as the
official code does), loading and tiling the media, and expanding each tag into its delimiters
and placeholders (LONGVITA.md section 2). Pixel tiles are emitted in the order their placeholders
appear in the sequence, so a `<video>` before an `<image>` is handled correctly. Used alike by
inference, training and evaluation. No model, no torch.distributed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from longvita.config import VisionConfig
from longvita.errors import PromptError
from longvita.processing.chat import Messages, build_prompt
from longvita.processing.image import load_image, tile_image, to_pixel_values
from longvita.processing.tokens import SpecialTokenIds, load_tokenizer, special_token_ids
from longvita.processing.video import DEFAULT_MAX_FPS, DEFAULT_MAX_FRAMES, load_video_frames

logger = logging.getLogger(__name__)

ImageInput = str | Path | Image.Image
VideoInput = str | Path

MAX_TILES = 12


@dataclass
class ProcessedPrompt:
    """Model inputs for one prompt."""

    input_ids: torch.Tensor
    """[seq] int64, tags expanded."""
    pixel_values: torch.Tensor
    """[num_tiles, 3, S, S] float32, in the order of their placeholders in `input_ids`."""
    visual_mask: torch.Tensor
    """[seq] bool, True at placeholder positions (tokens_per_tile per tile)."""
    image_grids: list[tuple[int, int]] = field(default_factory=list)
    """(cols, rows) chosen for each image, in tag order."""
    video_frames: list[int] = field(default_factory=list)
    """Frames sampled from each video, in tag order."""

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_tiles(self) -> int:
        return self.pixel_values.shape[0]


def expand_tags(
    ids: Sequence[int],
    *,
    tokens: SpecialTokenIds,
    tokens_per_tile: int,
    image_grids: Sequence[tuple[int, int]],
    video_frames: Sequence[int],
) -> list[int]:
    """Replace the n-th `<image>` / `<video>` tag by the n-th image's / video's tokens.

    image: <img> T x <IMG_CONTEXT> </img> (first tile: the thumbnail or the only tile), then if
    it has more than one tile, per tile row: "\\n", per tile <patch> T x <PATCH_CONTEXT> </patch>.
    video: per frame <vid> T x <VID_CONTEXT> </vid>.
    """
    out: list[int] = []
    images, videos = iter(image_grids), iter(video_frames)
    for token in ids:
        if token == tokens.image_tag:
            cols, rows = next(images)
            out += [tokens.img_start] + [tokens.img_context] * tokens_per_tile + [tokens.img_end]
            if cols * rows > 1:
                patch = [tokens.patch_start] + [tokens.patch_context] * tokens_per_tile
                patch.append(tokens.patch_end)
                for _ in range(rows):
                    out += tokens.newline
                    out += patch * cols
        elif token == tokens.video_tag:
            frame = [tokens.vid_start] + [tokens.vid_context] * tokens_per_tile + [tokens.vid_end]
            out += frame * next(videos)
        else:
            out.append(token)
    return out


class Processor:
    """Turns chat messages with `<image>`/`<video>` tags and their media into model inputs."""

    def __init__(self, tokenizer, vision: VisionConfig, *, max_tiles: int = MAX_TILES) -> None:
        self.tokenizer = tokenizer
        self.tokens = special_token_ids(tokenizer)
        self.tile_size = vision.image_size
        self.tokens_per_tile = vision.tokens_per_tile
        self.max_tiles = max_tiles

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
        images, videos = list(images or []), list(videos or [])
        ids = self.tokenize(build_prompt(messages))
        self._check_media_counts(ids, len(images), len(videos))
        tiles_per_tag: list[torch.Tensor] = []  # pixel tensors in tag order
        image_grids, video_frames = [], []
        image_iter, video_iter = iter(images), iter(videos)
        for token in ids:
            if token == self.tokens.image_tag:
                tiled = tile_image(
                    load_image(next(image_iter)), tile_size=self.tile_size, max_tiles=self.max_tiles
                )
                image_grids.append(tiled.grid)
                tiles_per_tag.append(to_pixel_values(tiled.tiles, tile_size=self.tile_size))
            elif token == self.tokens.video_tag:
                frames = load_video_frames(
                    next(video_iter),
                    max_frames=DEFAULT_MAX_FRAMES if max_frames is None else max_frames,
                    max_fps=DEFAULT_MAX_FPS if fps is None else fps,
                )
                video_frames.append(len(frames))
                tiles_per_tag.append(to_pixel_values(frames, tile_size=self.tile_size))
        expanded = expand_tags(
            ids,
            tokens=self.tokens,
            tokens_per_tile=self.tokens_per_tile,
            image_grids=image_grids,
            video_frames=video_frames,
        )
        input_ids = torch.tensor(expanded, dtype=torch.int64)  # [seq]
        visual_mask = torch.isin(input_ids, torch.tensor(self.tokens.context))  # [seq]
        size = self.tile_size
        pixel_values = (
            torch.cat(tiles_per_tag) if tiles_per_tag else torch.zeros(0, 3, size, size)
        )  # [num_tiles, 3, S, S]
        return ProcessedPrompt(
            input_ids=input_ids,
            pixel_values=pixel_values,
            visual_mask=visual_mask,
            image_grids=image_grids,
            video_frames=video_frames,
        )

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
