"""Video frames: which frames to take from a video file or a frame directory, and decoding them.

This module owns frame selection (the official Long-VITA formulas, reproduced exactly),
planning from headers only (`plan_video`: the frames to take, the source resolution, the
`max_pixels` check) and turning a video file (PyAV) or a directory of jpg/png frames into RGB
PIL images, one frame at a time (`iter_video_frames`). It does not tile or normalise frames
(`longvita.processing.image.to_pixel_values` does) and knows nothing about tokens. Seeking
(the frame table and the seeking decoder) lives in `video_seek`, listing, header reading and
decoding of frame files in `frame_dirs`; this module chooses between them.

Frame k of a video file is the k-th frame in presentation order, the k-th frame a decoder
outputs when it decodes the file from the start. Two paths decode the selected frames and give
the same pixels: sequential (decode from the start up to the last selected frame) and seeking
(jump to the keyframe before each far-away frame and decode forward from it: `video_seek`).

Memory: a stream of more than `max_pixels` pixels per frame is refused from its header, before
decoding. A frame of up to DECODE_DOWNSCALE_PIXELS is converted to RGB at full size, exactly as
the official code does; a larger one is scaled down by the RGB conversion itself (no full-size
RGB copy exists) and decoded with slice threads only (frame threads each hold a full-size frame).
A frame directory's files go through `image.load_image` (same limit); a file whose header cannot
be read is dropped at planning, one that fails to decode later is replaced by its neighbour, and
each is counted (`VideoPlan.num_skipped`, `DecodeReport.num_replaced`) with one warning a video.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import av
from PIL import Image

from longvita.errors import MediaError
from longvita.processing.frame_dirs import (
    DecodeReport,
    iter_frame_files,
    list_frame_files,
    read_frame_headers,
)
from longvita.processing.image import DEFAULT_MAX_PIXELS, check_pixels
from longvita.processing.video_seek import (
    SeekMismatch,
    scan_frame_table,
    seek_frames,
    worth_seeking,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_FRAMES = 4096
DEFAULT_MAX_FPS = 1.0
DECODE_DOWNSCALE_PIXELS = 3840 * 2160
"""Frames with more pixels (8,294,400: 4K UHD) are scaled down to fit it while being converted to
RGB. Every common video (up to 4K UHD) decodes exactly as in the official code; above it (8K,
huge screen recordings, decompression bombs) a frame ends as one 448-pixel tile anyway (padded
to a square, so its longer side sets the scale), and the longer side keeps at least 2,880
pixels (6.4x the tile) while each RGB copy costs at most 33 MB instead of, for an 8192x8192
frame, 268 MB."""
DECODE_INTERPOLATION = "AREA"
"""swscale filter of that scaling (area averaging: the standard for strong downscaling)."""
MAX_REFERENCE_FRAMES = 16
"""The most reference frames a decoder keeps (H.264 and HEVC allow 16, VP9 and AV1 fewer)."""


def _check_limits(max_frames: int, max_fps: float) -> None:
    if max_frames < 1 or not max_fps > 0:
        raise ValueError(f"need max_frames >= 1 and max_fps > 0, got {max_frames=}, {max_fps=}")


def video_frame_indices(
    num_frames: int, fps: float, *, max_frames: int, max_fps: float
) -> list[int]:
    """Indices of the frames to take from a video of num_frames frames at fps.

    Official formula: `step = max(fps / max_fps, num_frames / (max_frames + 1))` and
    `[int(k * step) for k in range(max_frames)]`, keeping indices < num_frames. Indices repeat
    when step < 1 (a video slower than max_fps).

    Known defect, reproduced on purpose: when the video is longer than max_frames / max_fps
    seconds, the step is num_frames / (max_frames + 1), so the last selected frame is about
    max_frames / (max_frames + 1) of the way through and the end of the video is never seen.
    """
    _check_limits(max_frames, max_fps)
    if not fps > 0 or num_frames < 0:
        raise ValueError(f"need fps > 0 and num_frames >= 0, got {fps=}, {num_frames=}")
    step = max(fps / max_fps, num_frames / (max_frames + 1))
    indices = [int(k * step) for k in range(max_frames)]
    return [i for i in indices if i < num_frames]


def frame_dir_indices(num_files: int, *, max_frames: int, max_fps: float) -> list[int]:
    """Indices of the files to take from a frame directory, which is taken as 1 fps.

    Official formula: `target = int(min(num_files * max_fps, max_frames))` and
    `[int(num_files / target) * k for k in range(target)]`. With max_fps > 1, target can exceed
    num_files and the stride is then 0 (every index is 0): reproduced as is.
    """
    _check_limits(max_frames, max_fps)
    target = int(min(num_files * max_fps, max_frames))
    if target == 0:
        raise ValueError(f"no frame to take from {num_files=} at {max_fps=}, {max_frames=}")
    stride = int(num_files / target)
    return [stride * k for k in range(target)]


@dataclass(frozen=True)
class VideoSource:
    """What the headers say about a video's frames, for the decoding memory bound."""

    width: int
    height: int
    """A file: its stream's frame size; a directory: its largest selected frame file's."""
    num_frames: int = 0
    """Frames in the file (0 for a directory)."""
    fps: float = 1.0
    """Average frame rate of the file (a directory is taken as 1 fps)."""
    bytes_per_pixel: float = 1.5
    """Bytes per pixel of a frame in the decoder's format (8-bit YUV 4:2:0: 1.5; a directory,
    decoded by Pillow: 0)."""
    is_directory: bool = False


@dataclass(frozen=True)
class VideoPlan:
    """The frames to take from a video, found from headers only (`plan_video`)."""

    indices: list[int]
    source: VideoSource
    num_skipped: int = 0
    """Selected frame files dropped because their header could not be read (directories)."""


def plan_video(
    path: str | os.PathLike,
    *,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_fps: float = DEFAULT_MAX_FPS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> VideoPlan:
    """The frames of a video file or frame directory to take, without decoding a frame.

    Raises PixelLimitError (a MediaError) naming the path when a frame has more than max_pixels
    pixels; MediaError for a missing path, a file without a video stream, frame rate or frame,
    or a directory without a readable frame file.
    """
    _check_limits(max_frames, max_fps)
    path = os.fspath(path)
    if os.path.isdir(path):
        files = list_frame_files(path)
        if not files:
            raise MediaError(f"frame directory {path!r} has no png/jpeg/jpg file")
        indices = frame_dir_indices(len(files), max_frames=max_frames, max_fps=max_fps)
        kept, (width, height) = read_frame_headers(path, files, indices, max_pixels)
        source = VideoSource(width, height, bytes_per_pixel=0, is_directory=True)
        return VideoPlan(indices=kept, source=source, num_skipped=len(indices) - len(kept))
    if not os.path.isfile(path):
        raise MediaError(f"video {path!r} does not exist")
    try:
        source = _probe(path, max_pixels)
    except av.FFmpegError as e:
        raise MediaError(f"cannot decode video {path!r}: {e}") from e
    num_frames, fps = source.num_frames, source.fps
    indices = video_frame_indices(num_frames, fps, max_frames=max_frames, max_fps=max_fps)
    logger.debug("%s: %d frames at %.3f fps, taking %d", path, num_frames, fps, len(indices))
    return VideoPlan(indices=indices, source=source)


def _count_packets(path: str) -> int:
    """Frames of the first video stream, counted by demuxing (no decoding), as decord does."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


@contextmanager
def open_video(
    path: str, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[tuple[av.container.InputContainer, av.VideoStream]]:
    """The opened file and its first video stream, checked against max_pixels, its decoder's
    threads set: frame threads (as many frames as threads) unless its frames are downscaled
    (slice threads). MediaError when the file has no video stream or none FFmpeg decodes."""
    with av.open(path) as container:
        if not container.streams.video:
            raise MediaError(f"video {path!r} has no video stream")
        stream = container.streams.video[0]
        if stream.codec_context is None:  # PyAV's stream of a codec FFmpeg cannot decode
            raise MediaError(
                f"video {path!r}: its video stream's codec has no decoder in this FFmpeg "
                "(PyAV's); re-encode it, e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`"
            )
        width, height = stream.codec_context.width, stream.codec_context.height
        check_pixels(f"video {path!r}", width, height, max_pixels)
        stream.thread_type = "SLICE" if width * height > DECODE_DOWNSCALE_PIXELS else "AUTO"
        yield container, stream


def decoder_frames(source: VideoSource) -> int:
    """An upper bound, in frames, of what a decoder of this stream holds as `open_video`
    configures it: 2 per thread (a frame thread's own frame and context; FFmpeg's automatic
    count is min(CPUs + 1, 16); 1 thread for downscaled streams: slice threads share the
    frame), the reference frames and the frame being output. Measured with H.264 at 1080p
    (3 reference frames, B-frames): 8 frames with 1 thread, 22 with 8, 38 with 16."""
    threads = 1
    if source.width * source.height <= DECODE_DOWNSCALE_PIXELS:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        cpus = min(cpus or 1, (source.height + 15) // 16)
        threads = min(cpus + 1, 16) if cpus > 1 else 1
    return 2 * threads + MAX_REFERENCE_FRAMES + 1


def _probe(path: str, max_pixels: int) -> VideoSource:
    """The first video stream's frame size, count and rate, from the container header."""
    with open_video(path, max_pixels) as (_, stream):
        context = stream.codec_context
        num_frames = stream.frames  # read while open: PyAV stream objects die with the container
        rate = stream.average_rate
        width, height, pixel_format = context.width, context.height, context.format
    if not rate:
        raise MediaError(f"video {path!r} has no average frame rate")
    if num_frames <= 0:
        num_frames = _count_packets(path)
    if num_frames <= 0:
        raise MediaError(f"video {path!r} has no frame")
    bytes_per_pixel = 1.5  # YUV 4:2:0, 8 bits, when the header does not say
    if pixel_format is not None and width * height:
        planes = sum(c.width * c.height * math.ceil(c.bits / 8) for c in pixel_format.components)
        bytes_per_pixel = max(bytes_per_pixel, planes / (width * height))
    return VideoSource(width, height, num_frames, float(rate), bytes_per_pixel)


def downscaled_size(width: int, height: int) -> tuple[int, int]:
    """The size a width x height frame is converted to RGB at: itself up to
    DECODE_DOWNSCALE_PIXELS pixels, else the largest size within it with the same aspect."""
    if width * height <= DECODE_DOWNSCALE_PIXELS:
        return width, height
    scale = math.sqrt(DECODE_DOWNSCALE_PIXELS / (width * height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def frame_to_image(frame: av.VideoFrame) -> Image.Image:
    """An RGB PIL image of a decoded frame, scaled down during the conversion when larger than
    DECODE_DOWNSCALE_PIXELS (see `downscaled_size`)."""
    width, height = downscaled_size(frame.width, frame.height)
    if (width, height) == (frame.width, frame.height):
        return frame.to_image()  # RGB, as the official decode
    return frame.to_image(width=width, height=height, interpolation=DECODE_INTERPOLATION)


def _check_frame(path: str, index: int, frame: av.VideoFrame, max_pixels: int) -> None:
    """The header's size was checked; a stream can change size midway (a new sequence header)."""
    check_pixels(f"video {path!r} (frame {index})", frame.width, frame.height, max_pixels)


def _decoded_frames(
    path: str, wanted: list[int], max_pixels: int, allow_seek: bool
) -> Iterator[tuple[int, av.VideoFrame]]:
    """(index, frame) for the wanted frames (ascending, distinct), one at a time: by seeking
    when allowed and worth it, then (or else) sequentially from the start for the ones not yet
    given. A frame past the end of the stream is not given; a frame of more than max_pixels
    pixels (the stream's size changed) raises PixelLimitError."""
    done = -1  # the last index given
    seek = allow_seek and bool(wanted) and worth_seeking(wanted)
    table = scan_frame_table(path) if seek else None
    if seek and table is None:
        logger.debug("%s: packets without distinct pts; decoding sequentially", path)
    if table is not None:
        reachable = [i for i in wanted if i < len(table.pts)]
        try:
            with open_video(path, max_pixels) as (container, stream):
                for index, frame in seek_frames(container, stream, reachable, table):
                    _check_frame(path, index, frame, max_pixels)
                    yield index, frame
                    done = index
            return
        except (SeekMismatch, av.FFmpegError) as e:
            logger.debug("%s: seeking failed (%s); decoding sequentially", path, e)
    rest = iter([i for i in wanted if i > done])
    target = next(rest, None)
    if target is None:
        return
    with open_video(path, max_pixels) as (container, stream):
        for index, frame in enumerate(container.decode(stream)):
            if index == target:
                _check_frame(path, index, frame, max_pixels)
                yield index, frame
                target = next(rest, None)
                if target is None:
                    return


def iter_video_frames(
    path: str | os.PathLike,
    indices: Sequence[int],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allow_seek: bool = True,
    report: DecodeReport | None = None,
) -> Iterator[Image.Image]:
    """The frames at indices of a video file or a frame directory, as RGB PIL images, decoded
    lazily in one pass, one frame at a time.

    Yields the frames in ascending index order, once per occurrence (a repeated index yields
    the same image), decoding only as the consumer pulls, so a consumer holds only the frames
    it keeps. A file's far-apart frames are reached by seeking to the keyframe before each one
    (with allow_seek; one frame table for the whole pass), otherwise one sequential decoder
    runs through the file once; both give the same pixels. Stops early where the stream ends
    before an index. Frames above DECODE_DOWNSCALE_PIXELS are scaled down (`frame_to_image`).
    A directory's files that fail to decode are replaced (see `frame_dirs.iter_frame_files`).
    Raises PixelLimitError for a frame above max_pixels, MediaError naming the path when the
    file cannot be decoded.
    """
    path = os.fspath(path)
    order = sorted(indices)
    if os.path.isdir(path):
        yield from iter_frame_files(path, order, max_pixels, report or DecodeReport())
        return
    index, image = -1, None  # the last frame converted
    try:
        decoded = _decoded_frames(path, sorted(set(order)), max_pixels, allow_seek)
        for wanted in order:
            if wanted != index:
                image = None  # drop the previous frame before decoding the next
                item = next(decoded, None)
                if item is None:
                    return
                index, image = item[0], frame_to_image(item[1])
                del item  # the decoder's frame buffer goes back to its pool
            yield image
        next(decoded, None)  # nothing left to decode: the pass ends and closes the file
    except av.FFmpegError as e:
        where = f"after frame {index}" if index >= 0 else "before its first planned frame"
        raise MediaError(
            f"cannot decode video {path!r} {where} (corrupt or truncated data?): {e}"
        ) from e
