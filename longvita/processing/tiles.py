"""Pixel tiles on demand: the lazy `TileSource` of a prompt.

Owns turning the media the Processor has planned (an image and its grid, a video and its frame
indices) into normalized pixel tiles only when they are asked for, by tile id in placeholder
order, so that a 4,096-frame video never holds all its pixels at once: video frames are decoded
in one pass as the ids come up (`video.iter_video_frames`) and each becomes its normalized tile
as soon as it is decoded, so only one decoded frame is held at a time; an image is decoded and
tiled on its first use and dropped when the next segment is read. Tiles are written straight
into the output tensor, so materializing a whole source costs its tiles plus one frame. Also
owns the bound on the host memory all this takes (`TileSource.decode_bytes`). Planning needs
only the image size and the frame indices, read from file headers (`image.image_size`,
`video.plan_video`).

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
from longvita.processing.image import (
    DEFAULT_MAX_PIXELS,
    PIL_RGB_BYTES,
    image_size,
    load_image,
    load_pil,
    tile_image,
    to_pixel_values,
    to_rgb,
)
from longvita.processing.video import (
    DecodeReport,
    VideoPlan,
    VideoSource,
    decoder_frames,
    downscaled_size,
    iter_video_frames,
    plan_video,
)

logger = logging.getLogger(__name__)

FLOAT_BYTES = 4
LOAD_IMAGE_BYTES_PER_PIXEL = 9
"""`image.load_image`'s peak per source pixel: the decoded file (up to 4 bytes), an RGBA copy
for compositing or the RGB result (4), a 1-byte palette or grey copy (1)."""
RGB_CONVERSION_BYTES_PER_PIXEL = 13
"""A decoded frame's conversion to a PIL image, per output pixel: PyAV's rgb24 frame (3), the
two copies `VideoFrame.to_image` makes (3 + 3) and the PIL image (4)."""
FRAME_TABLE_BYTES_PER_FRAME = 200
"""The demuxer's index and the seeking frame table, per frame of a video file."""


def _tile_bytes(tile_size: int) -> int:
    return 3 * tile_size * tile_size * FLOAT_BYTES  # one [3, S, S] float32 tile


def normalize_bytes(width: int, height: int, tile_size: int, num_images: int = 1) -> int:
    """Host bytes `image.to_pixel_values` holds for num_images images of width x height, beyond
    the images: the padded square (4 bytes/pixel), the bicubic resize's horizontal pass and
    result, the float32 arrays of each image (3 tiles' worth at once) and the stacked and
    permuted results (2 per image), for one image at a time + its results."""
    side, s = max(width, height), tile_size
    square = PIL_RGB_BYTES * side * side if width != height else 0
    resize = PIL_RGB_BYTES * s * (side + s)
    return square + resize + (3 * num_images + 3) * _tile_bytes(s)


class TileSegment(Protocol):
    """The tiles of one medium (an image, a video, a ready tensor), ids local to it."""

    num_tiles: int

    def load(self, local_ids: list[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [len(local_ids), 3, S, S], in the order asked; written into out if given."""
        ...

    def release(self) -> None:
        """Drop any decoded state (decoders, decoded images); a later load starts again."""
        ...

    def decode_bytes(self, batch_size: int) -> int:
        """Host bytes held while loading batch_size tiles at a time, beyond `load`'s output."""
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

    def load(self, local_ids: list[int], out: torch.Tensor | None = None) -> torch.Tensor:
        pixels = self.pixel_values[local_ids]  # [n, 3, S, S]
        return pixels if out is None else out.copy_(pixels)

    def release(self) -> None:
        pass

    def decode_bytes(self, batch_size: int) -> int:
        """The batch indexed out of the tensor, before its copy into a mixed batch."""
        return min(batch_size, self.num_tiles) * _tile_bytes(self.pixel_values.shape[-1])


class ImageTiles:
    """One image: decoded and tiled on first use; the PIL tiles are kept until `release`."""

    def __init__(
        self,
        image: str | os.PathLike | Image.Image,
        grid: tuple[int, int],
        *,
        tile_size: int,
        max_tiles: int,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        size: tuple[int, int] | None = None,
    ) -> None:
        self.image = image
        self.grid = grid
        self.tile_size = tile_size
        self.max_tiles = max_tiles
        self.max_pixels = max_pixels
        self.size = size
        """(width, height) from planning (`image_size`); read from the header if not given."""
        cols, rows = grid
        self.num_tiles = cols * rows + (1 if cols * rows > 1 else 0)  # + thumbnail
        self._tiles: list[Image.Image] | None = None

    def load(self, local_ids: list[int], out: torch.Tensor | None = None) -> torch.Tensor:
        if self._tiles is None:
            image = load_image(self.image, max_pixels=self.max_pixels)
            tiled = tile_image(image, tile_size=self.tile_size, max_tiles=self.max_tiles)
            if tiled.grid != self.grid:
                raise MediaError(
                    f"image {self._name()} changed since the prompt was built: grid "
                    f"{tiled.grid}, expected {self.grid}"
                )
            self._tiles = tiled.tiles
        tiles = [self._tiles[i] for i in local_ids]
        pixels = to_pixel_values(tiles, tile_size=self.tile_size)  # [n, 3, S, S]
        return pixels if out is None else out.copy_(pixels)

    def release(self) -> None:
        self._tiles = None

    def decode_bytes(self, batch_size: int) -> int:
        """decoding + tiling + normalizing, for the W x H image and its C x R grid of S:

        decoding: LOAD_IMAGE_BYTES_PER_PIXEL * W * H;
        tiling: 4 * (W * H + C*S * H + C*S * R*S + S * H) (the RGB image, the grid resize's
            horizontal pass and result, the thumbnail's horizontal pass) + the PIL tiles;
        normalizing: the PIL tiles (4 * S*S each) + `normalize_bytes` of a batch.
        The phases are added up (see `TileSource.decode_bytes`).
        """
        width, height = self.size or image_size(self.image, max_pixels=self.max_pixels)
        (cols, rows), s = self.grid, self.tile_size
        pil_tiles = PIL_RGB_BYTES * s * s * self.num_tiles
        decoding = LOAD_IMAGE_BYTES_PER_PIXEL * width * height
        resize = width * height + cols * s * height + cols * s * rows * s + s * height
        tiling = PIL_RGB_BYTES * resize + pil_tiles
        batch = min(batch_size, self.num_tiles)
        return decoding + tiling + pil_tiles + normalize_bytes(s, s, s, batch)

    def _name(self) -> str:
        return "(PIL image)" if isinstance(self.image, Image.Image) else repr(os.fspath(self.image))


class VideoFrameTiles:
    """One video, one tile per selected frame, decoded in a single pass as the ids come up.

    Ids asked in increasing order (repeats allowed) decode every frame once; an id before the
    last one decoded restarts the pass (`num_passes` counts them). Each frame becomes its tile
    as soon as it is asked for, so one decoded frame is held at a time. When the stream ends
    before a frame its header promised, the last decoded frame stands in for the missing ones
    (with a warning), as the prompt already holds their placeholders.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        frame_indices: Sequence[int],
        *,
        tile_size: int,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        source: VideoSource | None = None,
        num_skipped_frames: int = 0,
    ) -> None:
        self.path = os.fspath(path)
        self.frame_indices = list(frame_indices)
        self.tile_size = tile_size
        self.max_pixels = max_pixels
        self.source = source
        """The headers' frame size (`video.plan_video`); read again when needed if not given."""
        self.num_tiles = len(self.frame_indices)
        self.num_skipped_frames = num_skipped_frames
        """Frame files of a directory dropped at planning (header unreadable): not in the prompt."""
        self.num_passes = 0
        """Decoding passes started over the file: 1 when tiles are read in order."""
        self._frames: Iterator[Image.Image] | None = None
        self._report = DecodeReport()  # of the current pass
        self._max_replaced = 0  # over the finished passes
        self._next = 0  # local id of the frame the pass yields next
        self._last: Image.Image | torch.Tensor | None = None  # frame _next - 1, or its tile
        self._ended = False

    @classmethod
    def from_plan(
        cls, path: str | os.PathLike, plan: VideoPlan, *, tile_size: int, max_pixels: int
    ) -> VideoFrameTiles:
        """The tiles of a video planned by `video.plan_video(path, ..., max_pixels=...)`."""
        return cls(
            path,
            plan.indices,
            tile_size=tile_size,
            max_pixels=max_pixels,
            source=plan.source,
            num_skipped_frames=plan.num_skipped,
        )

    @property
    def num_replaced_frames(self) -> int:
        """Frame files of a directory that failed to decode and were replaced by a neighbour
        (the most in one pass)."""
        return max(self._max_replaced, self._report.num_replaced)

    def load(self, local_ids: list[int], out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty(len(local_ids), 3, self.tile_size, self.tile_size)  # [n, 3, S, S]
        for k, local_id in enumerate(local_ids):
            out[k] = self._tile(local_id)  # [3, S, S]
        return out

    def release(self) -> None:
        if self._frames is not None:
            self._frames.close()  # closes the container
        self._max_replaced = self.num_replaced_frames
        self._frames, self._next, self._last, self._ended = None, 0, None, False

    def decode_bytes(self, batch_size: int) -> int:
        """decoder + RGB conversion + the frame + `normalize_bytes` of it + the last tile + the
        frame table, for W x H frames converted to RGB at w x h (`video.downscaled_size`):

        decoder: `video.decoder_frames` * W * H * the decoder's bytes per pixel (1.5 for 8-bit
            YUV 4:2:0);
        RGB conversion: RGB_CONVERSION_BYTES_PER_PIXEL * w * h, the frame: 4 * w * h;
        frame table: FRAME_TABLE_BYTES_PER_FRAME per frame of the file.
        A frame directory has no decoder and no table; its reader holds the previous frame while
        loading the next: (LOAD_IMAGE_BYTES_PER_PIXEL + 4) * W * H in place of the conversion,
        W x H its largest selected file's, never downscaled. Frames are normalized one at a
        time, so batch_size does not change it. The phases are added up (see
        `TileSource.decode_bytes`).
        """
        source = self.source or plan_video(self.path, max_pixels=self.max_pixels).source
        width, height = source.width, source.height  # frame files are not downscaled
        if not source.is_directory:
            width, height = downscaled_size(width, height)
        frame = PIL_RGB_BYTES * width * height
        normalizing = frame + normalize_bytes(width, height, self.tile_size)
        if source.is_directory:
            loading = (LOAD_IMAGE_BYTES_PER_PIXEL + PIL_RGB_BYTES) * width * height
            return loading + normalizing + _tile_bytes(self.tile_size)
        pixels = source.width * source.height
        decoder = round(decoder_frames(source) * pixels * source.bytes_per_pixel)
        converting = RGB_CONVERSION_BYTES_PER_PIXEL * width * height
        table = FRAME_TABLE_BYTES_PER_FRAME * source.num_frames
        return decoder + converting + normalizing + _tile_bytes(self.tile_size) + table

    def _tile(self, local_id: int) -> torch.Tensor:
        """The tile of local_id, decoding on from the pass's position (restarting if behind)."""
        if self._frames is None or local_id < self._next - 1:
            self.release()
            self._report = DecodeReport()
            self._frames = iter_video_frames(
                self.path, self.frame_indices, max_pixels=self.max_pixels, report=self._report
            )
            self.num_passes += 1
        while self._next <= local_id and not self._ended:
            frame = next(self._frames, None)
            if frame is None:
                self._end_early()
                break
            self._last, self._next = frame, self._next + 1
            if self._next == self.num_tiles:
                next(self._frames, None)  # the pass is over: it closes its file and reports
        if isinstance(self._last, Image.Image):
            self._last = to_pixel_values([self._last], tile_size=self.tile_size)[0]
        assert self._last is not None
        return self._last

    def _end_early(self) -> None:
        if self._last is None:
            raise MediaError(f"video {self.path!r} has no decodable frame")
        logger.warning(
            "%s: decoded only %d of the %d selected frames; repeating the last one",
            self.path,
            self._next,
            self.num_tiles,
        )
        self._ended = True


class FrameListTiles:
    """A video given as RGB frames in memory (PIL images): the frames at `frame_indices`, one
    tile each, normalized when asked for."""

    def __init__(
        self, frames: Sequence[Image.Image], frame_indices: Sequence[int], *, tile_size: int
    ) -> None:
        self.frames = list(frames)
        self.frame_indices = list(frame_indices)
        self.tile_size = tile_size
        self.num_tiles = len(self.frame_indices)

    def load(self, local_ids: list[int], out: torch.Tensor | None = None) -> torch.Tensor:
        chosen = [self._frame(self.frame_indices[i]) for i in local_ids]
        pixels = to_pixel_values(chosen, tile_size=self.tile_size)  # [n, 3, S, S]
        return pixels if out is None else out.copy_(pixels)

    def _frame(self, index: int) -> Image.Image:
        frame = self.frames[index]
        load_pil(frame, f"video frame {index} (PIL)")  # a MediaError, not PIL's own
        return to_rgb(frame)

    def release(self) -> None:
        pass

    def decode_bytes(self, batch_size: int) -> int:
        """The batch's RGB copies and their normalization (the frames are the caller's)."""
        width = max(frame.width for frame in self.frames)
        height = max(frame.height for frame in self.frames)
        batch = min(batch_size, self.num_tiles)
        return batch * (PIL_RGB_BYTES * width * height + _tile_bytes(self.tile_size)) + (
            normalize_bytes(width, height, self.tile_size, batch)
        )


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
        runs = [(index, list(run)) for index, run in itertools.groupby(ids, self._segment_of)]
        if not runs:
            return torch.zeros(0, 3, self.tile_size, self.tile_size)
        if len(runs) == 1:  # one medium: its own output, no copy
            return self._load(*runs[0])
        out = torch.empty(len(ids), 3, self.tile_size, self.tile_size)  # [n, 3, S, S]
        position = 0
        for index, run in runs:
            self._load(index, run, out[position : position + len(run)])
            position += len(run)
        return out

    def get_all(self) -> torch.Tensor:
        """Every tile, [num_tiles, 3, S, S]: its tiles plus one medium's decoding at a time."""
        return self.get(range(self.num_tiles))

    def materialize(self) -> TileSource:
        """A source over `get_all()`, the media decoded now (training samples need every tile)."""
        return TileSource.from_tensor(self.get_all())

    def close(self) -> None:
        """Drop all decoded state (open video decoders, decoded images)."""
        for segment in self.segments:
            segment.release()
        self._active = None

    def decode_bytes(self, batch_size: int) -> int:
        """An upper bound of the host bytes held while this source's tiles are decoded and
        normalized batch_size at a time (`get` of batch_size ids; `get_all` is batch_size =
        num_tiles): the float32 output, min(batch_size, num_tiles) * 3 * S * S * 4, plus the
        most any one segment holds at a time (segments are decoded one after the other):

        an image (`ImageTiles.decode_bytes`): the decoded image at its source resolution, its
            grid resize and tiles, their normalization;
        a video (`VideoFrameTiles.decode_bytes`): the decoder's frame buffers at the stream's
            resolution, one RGB frame after any decode-time downscale, its padded square and
            normalization, the last tile;
        tiles already in memory: the batch indexed out of them.
        Within a segment the phases (decoding, converting, tiling, normalizing) are added up
        rather than maxed: memory freed by one phase is not always reusable by the next
        (allocator fragmentation: our measurements fall between the max and the sum). Not counted:
        the libraries' fixed overhead (codec tables, thread stacks: a few MB). Reads headers
        again only for segments built without their planned size.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        output = min(batch_size, self.num_tiles) * _tile_bytes(self.tile_size)
        working = [segment.decode_bytes(batch_size) for segment in self.segments]
        return output + max(working, default=0)

    def _load(self, index: int, ids: list[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """The tiles ids (all in segment index), the segment made the one holding state."""
        segment = self.segments[index]
        if segment is not self._active:
            if self._active is not None:
                self._active.release()
            self._active = segment
        return segment.load([i - self._starts[index] for i in ids], out)

    def _segment_of(self, tile_id: int) -> int:
        return bisect.bisect_right(self._starts, tile_id) - 1
