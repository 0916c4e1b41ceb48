"""What makes two prompts share a prefix: token ids, and the media behind the visual slots.

Owns `PromptKey`: a prompt's token ids [N] beside the identity of the medium behind each visual
slot [N] (0 at text tokens), and the length of the prefix two keys share, compared token by
token. Two prompts with the same token ids but another image (or the same file changed on
disk, or another `max_frames`) differ at the first slot of that medium. For a store to find the
prompts that start alike without comparing against each one, a key also hashes its prefixes at
the lengths of `prefix_levels` (every length below `PREFIX_BLOCK` tokens, then every multiple).

A medium's identity is a hash of its content and of what turns it into pixel tiles, never its
path (a server fetches every request's media into a new directory):
- an image file: its bytes (streamed); a PIL image: its pixels as RGB (`to_rgb`: a palette
  image's own bytes are indices); with the tile grid, tile size and tile limit;
- a video file: its bytes; a frame directory: the selected files' bytes, in order; frames in
  memory: the selected frames' pixels; with the selected frame indices (which `max_frames` and
  `fps` decide) and the tile size;
- tiles already in memory: their values.
File digests are remembered per (path, inode, size, mtime, ctime), so a second prompt about an
unchanged file in the same process costs a `stat`, and a rewritten file (its ctime moves) is
hashed again. Nothing here decodes a frame. No model, no torch.distributed.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from PIL import Image

from longvita.processing.frame_dirs import list_frame_files
from longvita.processing.image import load_pil, to_rgb
from longvita.processing.tiles import (
    FrameListTiles,
    ImageTiles,
    TensorTiles,
    TileSource,
    VideoFrameTiles,
)

DIGEST_MEMO_SIZE = 4096
"""File digests remembered per process (by path and stat)."""
SUPERSEDE_DIVISOR = 16
"""A prompt replaces a cached one it shares all but 1/16 of (see `PromptKey.covers`)."""
PREFIX_BLOCK = 16
"""Prefix hashes are taken at every length below this, then at its multiples."""


def prefix_levels(num_tokens: int, block: int = PREFIX_BLOCK) -> list[int]:
    """The prefix lengths a key of `num_tokens` hashes: 1, 2, ..., block - 1, then block,
    2 * block, ... up to `num_tokens` (a 1M-token prompt: about 62,500)."""
    return [*range(1, min(block, num_tokens + 1)), *range(block, num_tokens + 1, block)]


@dataclass(frozen=True, eq=False)
class PromptKey:
    """One prompt as the prefix cache compares it."""

    token_ids: torch.Tensor
    """[N] int64 on the CPU: the expanded prompt."""
    media_ids: torch.Tensor
    """[N] int64 on the CPU: the identity of the medium behind each visual slot, 0 elsewhere."""

    def __post_init__(self) -> None:
        if self.token_ids.shape != self.media_ids.shape or self.token_ids.dim() != 1:
            raise ValueError(
                f"token_ids {tuple(self.token_ids.shape)} and media_ids "
                f"{tuple(self.media_ids.shape)} must be the same 1-D shape"
            )

    @property
    def num_tokens(self) -> int:
        return self.token_ids.numel()

    @functools.cached_property
    def digest(self) -> str:
        """A hex name of the whole key (the same prompt and media give the same name)."""
        hasher = hashlib.sha256()
        hasher.update(self.token_ids.to(torch.int64).contiguous().numpy())
        hasher.update(self.media_ids.to(torch.int64).contiguous().numpy())
        return hasher.hexdigest()[:32]

    @functools.cached_property
    def prefix_hashes(self) -> list[int]:
        """Hashes of the prefixes at the lengths `prefix_levels(num_tokens)`, each chained on
        the one before: two keys with the same prefix of such a length have the same hash there
        (Python's hash: within one process only, and a match still needs `shared_prefix`)."""
        pairs = torch.stack([self.token_ids, self.media_ids], dim=1).to(torch.int64)
        data = pairs.contiguous().numpy().tobytes()  # 16 bytes a token
        hashes, previous, start = [], 0, 0
        for end in prefix_levels(self.num_tokens):
            previous = hash((previous, data[16 * start : 16 * end]))
            hashes.append(previous)
            start = end
        return hashes

    def shared_prefix(self, other: PromptKey) -> int:
        """Tokens at the start of both prompts with the same id and the same medium."""
        n = min(self.num_tokens, other.num_tokens)
        same = (self.token_ids[:n] == other.token_ids[:n]) & (
            self.media_ids[:n] == other.media_ids[:n]
        )  # [n]
        differ = (~same).nonzero()
        return int(differ[0]) if len(differ) else n

    def covers(self, other: PromptKey) -> bool:
        """Whether this prompt holds all of `other` but at most 1/`SUPERSEDE_DIVISOR` of its
        tokens: the next question about the same video, the next turn of a conversation. A
        prefix cache keeps only the newer of two such prompts."""
        unshared = other.num_tokens - self.shared_prefix(other)
        return unshared * SUPERSEDE_DIVISOR <= other.num_tokens

    @classmethod
    def of_prompt(
        cls,
        input_ids: torch.Tensor,
        visual_mask: torch.Tensor,
        tiles: TileSource,
        *,
        tokens_per_tile: int,
    ) -> PromptKey | None:
        """The key of a prompt planned by the Processor (ids [N], visual_mask [N] bool, its lazy
        TileSource); None when a medium has no identity this module knows how to take."""
        identities = [segment_identity(segment) for segment in tiles.segments]
        if any(identity is None for identity in identities):
            return None
        sizes = torch.tensor([segment.num_tiles for segment in tiles.segments], dtype=torch.long)
        per_tile = torch.repeat_interleave(torch.tensor(identities, dtype=torch.int64), sizes)
        per_slot = torch.repeat_interleave(per_tile, tokens_per_tile)  # [num_tiles * tpt]
        visual_mask = visual_mask.cpu()
        num_slots = int(visual_mask.sum())
        if num_slots != per_slot.numel():
            raise ValueError(
                f"the prompt has {num_slots} visual slots but its {tiles.num_tiles} tiles fill "
                f"{per_slot.numel()} ({tokens_per_tile} per tile)"
            )
        media_ids = torch.zeros(visual_mask.shape, dtype=torch.int64)
        media_ids[visual_mask] = per_slot
        return cls(input_ids.cpu().to(torch.int64), media_ids)


def segment_identity(segment: object) -> int | None:
    """A non-zero int64 naming one medium's content and tiling; None for an unknown kind."""
    if isinstance(segment, ImageTiles):
        parts = ["image", _image_digest(segment.image), segment.grid, segment.max_tiles]
        parts.append(segment.tile_size)
    elif isinstance(segment, VideoFrameTiles):
        content = (
            _frame_dir_digest(segment.path, segment.frame_indices)
            if os.path.isdir(segment.path)
            else file_digest(segment.path)
        )
        parts = ["video", content, segment.frame_indices, segment.tile_size]
    elif isinstance(segment, FrameListTiles):
        chosen = [segment.frames[i] for i in sorted(set(segment.frame_indices))]
        digests = [_pil_digest(frame) for frame in chosen]
        parts = ["frames", digests, segment.frame_indices, segment.tile_size]
    elif isinstance(segment, TensorTiles):
        parts = ["tensor", _tensor_digest(segment.pixel_values)]
    else:
        return None
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True) or 1


class _DigestMemo:
    """File digests by (path, inode, size, mtime, ctime), least recently used dropped."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._digests: OrderedDict[tuple, str] = OrderedDict()
        self._lock = threading.Lock()

    def digest(self, path: str | os.PathLike) -> str:
        path = os.path.realpath(path)
        stat = os.stat(path)
        key = (path, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        with self._lock:
            if key in self._digests:
                self._digests.move_to_end(key)
                return self._digests[key]
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        with self._lock:
            self._digests[key] = digest
            while len(self._digests) > self.size:
                self._digests.popitem(last=False)
        return digest


_MEMO = _DigestMemo(DIGEST_MEMO_SIZE)


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (read in blocks), remembered while the file is unchanged."""
    return _MEMO.digest(path)


def _image_digest(image: str | os.PathLike | Image.Image) -> str:
    return _pil_digest(image) if isinstance(image, Image.Image) else file_digest(image)


def _pil_digest(image: Image.Image) -> str:
    """sha256 of the RGB pixels the image is tiled from (`to_rgb`): its own bytes are not
    enough (a palette image's are indices, and a transparent colour changes what is seen)."""
    load_pil(image, "image (PIL)")
    if image.mode != "RGB" or image.has_transparency_data:
        image = to_rgb(image)
    hasher = hashlib.sha256(f"RGB {image.size}".encode())
    hasher.update(image.tobytes())
    return hasher.hexdigest()


def _tensor_digest(tensor: torch.Tensor) -> str:
    hasher = hashlib.sha256(f"{tensor.dtype} {tuple(tensor.shape)}".encode())
    hasher.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
    return hasher.hexdigest()


def _frame_dir_digest(directory: str, frame_indices: list[int]) -> list[str]:
    """The digests of a frame directory's selected files, in file order."""
    files = list_frame_files(directory)
    return [file_digest(files[i]) for i in sorted(set(frame_indices))]
