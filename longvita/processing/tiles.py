"""Pixel tiles on demand: the lazy `TileSource` of a prompt.

Owns turning the media the Processor has planned (an image and its grid, a video and its frame
indices) into normalized pixel tiles only when they are asked for, by tile id in placeholder
order, so that a 4,096-frame video never holds all its pixels at once: video frames are decoded
in one pass as the ids come up (`video.iter_video_frames`), an image is decoded and tiled on its
first use and dropped when the next segment is read. Planning needs only the image size and the
frame indices, read from file headers (`image_size`, `video.select_video_frames`).

Does not own the tiling and normalization math (`image`), frame selection and decoding
(`video`), or which tiles are needed when (the inference engine asks). No model, no tokens.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
from PIL import Image

from longvita.errors import MediaError
from longvita.processing.image import load_image, tile_image, to_pixel_values
from longvita.processing.video import iter_video_frames

logger = logging.getLogger(__name__)

DECODE_BATCH = 16
"""Video frames decoded per seek batch (see `video.iter_video_frames`)."""


def image_size(image: str | os.PathLike | Image.Image) -> tuple[int, int]:
    """(width, height) of an image, read from the file header without decoding the pixels.

    Raises MediaError naming the path when the file is missing or not an image.
    """
    if isinstance(image, Image.Image):
        return image.size
    path = os.fspath(image)
    try:
        with Image.open(path) as opened:
            return opened.size
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise MediaError(f"cannot read image {path!r}: {e}") from e


class TileSegment(Protocol):
    """The tiles of one medium (an image, a video, a ready tensor), ids local to it."""

    num_tiles: int

    def load(self, local_ids: list[int]) -> torch.Tensor:
        """float32 [len(local_ids), 3, S, S], in the order asked."""
        ...

    def release(self) -> None:
        """Drop any decoded state (decoders, decoded images); a later load starts again."""
        ...


class TensorTiles:
    """Tiles already in memory: [num_tiles, 3, S, S]."""

    def __init__(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must be [num_tiles, 3, S, S], got {tuple(pixel_values.shape)}"
            )
        self.pixel_values = pixel_values
        self.num_tiles = pixel_values.shape[0]

    def load(self, local_ids: list[int]) -> torch.Tensor:
        return self.pixel_values[local_ids]  # [n, 3, S, S]

    def release(self) -> None:
        pass


class ImageTiles:
    """One image: decoded and tiled on first use; the PIL tiles are kept until `release`."""

    def __init__(
        self,
        image: str | os.PathLike | Image.Image,
        grid: tuple[int, int],
        *,
        tile_size: int,
        max_tiles: int,
    ) -> None:
        self.image = image
        self.grid = grid
        self.tile_size = tile_size
        self.max_tiles = max_tiles
        cols, rows = grid
        self.num_tiles = cols * rows + (1 if cols * rows > 1 else 0)  # + thumbnail
        self._tiles: list[Image.Image] | None = None

    def load(self, local_ids: list[int]) -> torch.Tensor:
        if self._tiles is None:
            tiled = tile_image(
                load_image(self.image), tile_size=self.tile_size, max_tiles=self.max_tiles
            )
            if tiled.grid != self.grid:
                raise MediaError(
                    f"image {self._name()} changed since the prompt was built: grid "
                    f"{tiled.grid}, expected {self.grid}"
                )
            self._tiles = tiled.tiles
        tiles = [self._tiles[i] for i in local_ids]
        return to_pixel_values(tiles, tile_size=self.tile_size)  # [n, 3, S, S]

    def release(self) -> None:
        self._tiles = None

    def _name(self) -> str:
        return "(PIL image)" if isinstance(self.image, Image.Image) else repr(os.fspath(self.image))


class VideoFrameTiles:
    """One video, one tile per selected frame, decoded in a single pass as the ids come up.

    Ids asked in increasing order (repeats allowed) decode every frame once; an id before the
    last one decoded restarts the pass (`num_passes` counts them). When the stream ends before
    a frame its header promised, the last decoded frame stands in for the missing ones (with a
    warning), as the prompt already holds their placeholders.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        frame_indices: Sequence[int],
        *,
        tile_size: int,
        decode_batch: int = DECODE_BATCH,
    ) -> None:
        self.path = os.fspath(path)
        self.frame_indices = list(frame_indices)
        self.tile_size = tile_size
        self.decode_batch = decode_batch
        self.num_tiles = len(self.frame_indices)
        self.num_passes = 0
        """Decoding passes started over the file: 1 when tiles are read in order."""
        self._frames: Iterator[Image.Image] | None = None
        self._next = 0  # local id of the frame the pass yields next
        self._last: Image.Image | None = None  # the frame of local id _next - 1
        self._ended = False

    def load(self, local_ids: list[int]) -> torch.Tensor:
        frames = [self._frame(k) for k in local_ids]
        return to_pixel_values(frames, tile_size=self.tile_size)  # [n, 3, S, S]

    def release(self) -> None:
        if self._frames is not None:
            self._frames.close()  # closes the container
        self._frames, self._next, self._last, self._ended = None, 0, None, False

    def _frame(self, local_id: int) -> Image.Image:
        if self._frames is None or local_id < self._next - 1:
            self.release()
            self._frames = iter_video_frames(
                self.path, self.frame_indices, batch_size=self.decode_batch
            )
            self.num_passes += 1
        while self._next <= local_id and not self._ended:
            frame = next(self._frames, None)
            if frame is None:
                self._end_early(local_id)
                break
            self._last, self._next = frame, self._next + 1
        assert self._last is not None
        return self._last

    def _end_early(self, local_id: int) -> None:
        if self._last is None:
            raise MediaError(f"video {self.path!r} has no decodable frame")
        logger.warning(
            "%s: decoded only %d of the %d selected frames; repeating the last one",
            self.path,
            self._next,
            self.num_tiles,
        )
        self._ended = True


class TileSource:
    """The pixel tiles of one prompt, in placeholder order, loaded on demand by id.

    `get(ids)` decodes and normalizes only those tiles; one segment (image or video) holds
    decoded state at a time, so reading the ids in increasing order decodes every medium once.
    """

    def __init__(self, segments: Sequence[TileSegment], *, tile_size: int) -> None:
        self.segments = list(segments)
        self.tile_size = tile_size
        sizes = [segment.num_tiles for segment in self.segments]
        self._starts = [0, *itertools.accumulate(sizes)]  # [num_segments + 1]
        self._active: TileSegment | None = None

    @classmethod
    def from_tensor(cls, pixel_values: torch.Tensor) -> TileSource:
        """Tiles already in memory, [num_tiles, 3, S, S]."""
        return cls([TensorTiles(pixel_values)], tile_size=pixel_values.shape[-1])

    @property
    def num_tiles(self) -> int:
        return self._starts[-1]

    def get(self, tile_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """float32 [len(tile_ids), 3, S, S]: the tiles with these ids, in the order given."""
        ids = tile_ids.tolist() if torch.is_tensor(tile_ids) else [int(i) for i in tile_ids]
        if any(not 0 <= i < self.num_tiles for i in ids):
            raise ValueError(f"tile ids {ids} out of range for {self.num_tiles} tiles")
        parts = []
        for index, run in itertools.groupby(ids, key=self._segment_of):
            segment, start = self.segments[index], self._starts[index]
            if segment is not self._active:
                if self._active is not None:
                    self._active.release()
                self._active = segment
            parts.append(segment.load([i - start for i in run]))
        if not parts:
            return torch.zeros(0, 3, self.tile_size, self.tile_size)
        return torch.cat(parts)  # [n, 3, S, S]

    def get_all(self) -> torch.Tensor:
        """Every tile, [num_tiles, 3, S, S]: for short prompts and tests (memory grows with it)."""
        return self.get(range(self.num_tiles))

    def materialize(self) -> TileSource:
        """A source over `get_all()`, the media decoded now (training samples need every tile)."""
        return TileSource.from_tensor(self.get_all())

    def close(self) -> None:
        """Drop all decoded state (open video decoders, decoded images)."""
        for segment in self.segments:
            segment.release()
        self._active = None

    def _segment_of(self, tile_id: int) -> int:
        return bisect.bisect_right(self._starts, tile_id) - 1
