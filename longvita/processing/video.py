"""Video frames: which frames to take from a video file or a frame directory, and decoding them.

This module owns frame selection (the official Long-VITA formulas, reproduced exactly) and
turning a video file (PyAV) or a directory of jpg/png frames into RGB PIL images. It does not
tile or normalise frames (`longvita.processing.image.to_pixel_values` does) and knows nothing
about tokens.

Frame k of a video file is the k-th frame in presentation order, the k-th frame a decoder
outputs when it decodes the file from the start. Two paths decode the selected frames and give
the same pixels: sequential (decode from the start up to the last selected frame) and seeking
(jump to the keyframe before each far-away frame and decode forward from it); see
`decode_video_frames`.
"""

from __future__ import annotations

import bisect
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import av
from PIL import Image

from longvita.errors import MediaError
from longvita.processing.image import load_image

logger = logging.getLogger(__name__)

DEFAULT_MAX_FRAMES = 4096
DEFAULT_MAX_FPS = 1.0
FRAME_FILE_SUFFIXES = ("png", "jpeg", "jpg")
# Seek only when it skips decoding more than this many frames; nearer frames are decoded through
# (a seek flushes the decoder and its threads, which costs about as much as a few frames).
SEEK_MIN_SKIP = 16


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


def _natural_key(text: str) -> tuple[tuple[object, ...], str]:
    """Sort key comparing digit runs as integers: 'frame2' < 'frame10'. Ties fall back to text."""
    parts = re.split(r"(\d+)", text)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), text


def list_frame_files(directory: str | os.PathLike) -> list[Path]:
    """The png/jpeg/jpg files under directory (recursively), in natural order of the full path."""
    paths = [
        os.path.join(root, name)
        for root, _dirs, files in os.walk(directory)
        for name in files
        if name.endswith(FRAME_FILE_SUFFIXES)
    ]
    return [Path(p) for p in sorted(paths, key=_natural_key)]


def _load_frame_dir(directory: str, max_frames: int, max_fps: float) -> list[Image.Image]:
    files = list_frame_files(directory)
    if not files:
        raise MediaError(f"frame directory {directory!r} has no png/jpeg/jpg file")
    indices = frame_dir_indices(len(files), max_frames=max_frames, max_fps=max_fps)
    logger.debug("%s: %d frame files, taking %d", directory, len(files), len(indices))
    return [load_image(files[i]) for i in indices]


def _count_packets(path: str) -> int:
    """Frames of the first video stream, counted by demuxing (no decoding), as decord does."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def _probe(path: str) -> tuple[int, float]:
    """(num_frames, average fps) of the first video stream."""
    with av.open(path) as container:
        if not container.streams.video:
            raise MediaError(f"video {path!r} has no video stream")
        stream = container.streams.video[0]
        num_frames = stream.frames  # read while open: PyAV stream objects die with the container
        rate = stream.average_rate
    if not rate:
        raise MediaError(f"video {path!r} has no average frame rate")
    if num_frames <= 0:
        num_frames = _count_packets(path)
    if num_frames <= 0:
        raise MediaError(f"video {path!r} has no frame")
    return num_frames, float(rate)


class _SeekMismatch(Exception):
    """The seeking decoder did not see the frame the frame table predicted."""


@dataclass(frozen=True)
class _FrameTable:
    """Where the frames of a video stream are, from one demux pass over its packets (no decoding).

    pts[k] is the pts of frame k: the k-th smallest pts of the stream's non-empty, non-discarded
    packets, as each such packet decodes to one frame and a decoder outputs them by pts.
    """

    pts: list[int]  # [num_frames], ascending, distinct
    keyframes: list[int]  # frame indices of the keyframe packets, ascending
    keyframe_at_pts: dict[int, int]  # pts of a keyframe -> its frame index

    def keyframe_before(self, index: int) -> int | None:
        """The last keyframe at or before frame index, None if there is none."""
        position = bisect.bisect_right(self.keyframes, index)
        return self.keyframes[position - 1] if position else None


def _scan_frame_table(path: str) -> _FrameTable | None:
    """The frame table of the first video stream; None when a packet has no pts or two packets
    share one (frames cannot then be told apart by pts)."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        packets = [
            (packet.pts, packet.is_keyframe)
            for packet in container.demux(stream)
            if packet.size > 0 and not packet.is_discard
        ]
    if any(pts is None for pts, _ in packets):
        return None
    packets.sort()
    pts = [p for p, _ in packets]
    if len(set(pts)) != len(pts):
        return None
    keyframes = [k for k, (_, is_keyframe) in enumerate(packets) if is_keyframe]
    return _FrameTable(pts=pts, keyframes=keyframes, keyframe_at_pts={pts[k]: k for k in keyframes})


def _frames_from_here(
    container: av.container.InputContainer, stream: av.VideoStream, table: _FrameTable
) -> Iterator[tuple[int, av.VideoFrame]]:
    """(frame index, frame) for the frames decoded from the container's current position.

    Frames before the first keyframe are dropped (after a seek, pictures that need frames before
    it); from that keyframe on, every frame must be the next one in the table, else _SeekMismatch.
    """
    index = None
    for packet in container.demux(stream):
        for frame in stream.decode(packet):  # the last, empty packet flushes the decoder
            if index is None:
                index = table.keyframe_at_pts.get(frame.pts)
                if index is None:
                    continue
            else:
                index += 1
                if index >= len(table.pts) or frame.pts != table.pts[index]:
                    raise _SeekMismatch(
                        f"frame {index}: decoded pts {frame.pts} is not the table's"
                    )
            yield index, frame


def _decode_up_to(frames: Iterator[tuple[int, av.VideoFrame]], target: int) -> av.VideoFrame:
    for index, frame in frames:
        if index >= target:
            if index != target:
                raise _SeekMismatch(f"frame {target} wanted, decoding started at frame {index}")
            return frame
    raise _SeekMismatch(f"the stream ended before frame {target}")


def _decode_seeking(
    path: str, wanted: Sequence[int], table: _FrameTable
) -> tuple[dict[int, Image.Image], int]:
    """The frames at wanted (ascending, distinct, all < len(table.pts)) and the number of seeks.

    For each wanted frame whose keyframe lies more than SEEK_MIN_SKIP frames past the last frame
    decoded, seek to that keyframe's pts (the demuxer lands on it or an earlier keyframe) and
    decode forward; otherwise keep decoding. Raises _SeekMismatch when a decoded frame is not the
    one the table predicts, so that the caller can decode sequentially instead. Every frame
    decoded is checked against the table; frames skipped by a seek are not decoded, so the
    one-frame-per-packet premise of the table is taken on trust there (a well-formed stream).
    """
    images: dict[int, Image.Image] = {}
    num_seeks, position = 0, -1  # position: index of the last frame decoded
    frames = None
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for target in wanted:
            keyframe = table.keyframe_before(target)
            if keyframe is not None and keyframe > position + SEEK_MIN_SKIP:
                if frames is not None:
                    frames.close()
                container.seek(table.pts[keyframe], stream=stream, backward=True, any_frame=False)
                frames, num_seeks = None, num_seeks + 1
            if frames is None:
                frames = _frames_from_here(container, stream, table)
            images[target] = _decode_up_to(frames, target).to_image()  # RGB
            position = target
    return images, num_seeks


def _worth_seeking(wanted: Sequence[int]) -> bool:
    """Whether some wanted frame is more than SEEK_MIN_SKIP frames past the previous one."""
    return any(b - a > SEEK_MIN_SKIP for a, b in zip([-1, *wanted[:-1]], wanted, strict=True))


def decode_video_frames(
    path: str | os.PathLike, indices: Sequence[int], *, allow_seek: bool = True
) -> list[Image.Image]:
    """The frames at indices of a video file's first video stream, as RGB PIL images.

    Frames come in ascending index order, once per occurrence in indices; an index past the last
    decodable frame gives no frame. With allow_seek, frames far apart are reached by seeking to
    the keyframe before each one (`_decode_seeking`); when no two are far apart, when the stream's
    timestamps are missing or repeated, or when seeking fails or lands on a frame other than the
    one predicted, it decodes sequentially from the start. Both paths give the same pixels.
    Raises MediaError naming the path when the file cannot be decoded.
    """
    path = os.fspath(path)
    wanted = sorted(set(indices))
    if not wanted:
        return []
    try:  # one seeking batch: the caller holds every frame anyway
        images = dict(_iter_wanted_frames(path, wanted, len(wanted), allow_seek=allow_seek))
    except av.FFmpegError as e:
        raise MediaError(f"cannot decode video {path!r}: {e}") from e
    return [images[i] for i in sorted(indices) if i in images]


def _load_video_file(path: str, max_frames: int, max_fps: float) -> list[Image.Image]:
    try:
        num_frames, fps = _probe(path)
    except av.FFmpegError as e:
        raise MediaError(f"cannot decode video {path!r}: {e}") from e
    indices = video_frame_indices(num_frames, fps, max_frames=max_frames, max_fps=max_fps)
    frames = decode_video_frames(path, indices)
    logger.debug("%s: %d frames at %.3f fps, taking %d", path, num_frames, fps, len(indices))
    if not frames:
        raise MediaError(f"video {path!r} has no decodable frame")
    if len(frames) < len(indices):
        logger.warning(
            "%s: decoded only %d of the %d selected frames (container said %d frames)",
            path,
            len(frames),
            len(indices),
            num_frames,
        )
    return frames


def load_video_frames(
    path: str | os.PathLike,
    *,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_fps: float = DEFAULT_MAX_FPS,
) -> list[Image.Image]:
    """The selected frames of a video file or a frame directory, as RGB PIL images.

    Raises MediaError naming the path for a missing path, an unreadable file, a file without a
    video stream or decodable frame, or a directory without frame files.
    """
    _check_limits(max_frames, max_fps)
    path = os.fspath(path)
    if os.path.isdir(path):
        return _load_frame_dir(path, max_frames, max_fps)
    if os.path.isfile(path):
        return _load_video_file(path, max_frames, max_fps)
    raise MediaError(f"video {path!r} does not exist")


# --- streaming: frame indices without decoding, then the frames lazily, batch by batch ---------


def select_video_frames(
    path: str | os.PathLike,
    *,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_fps: float = DEFAULT_MAX_FPS,
) -> list[int]:
    """The indices `load_video_frames` takes (frames of a file, files of a directory), found
    without decoding a frame: from the container header (or a demux pass) or the file list.

    Raises MediaError as `load_video_frames` does for a missing path, a file without a video
    stream or frame rate, or a directory without frame files.
    """
    _check_limits(max_frames, max_fps)
    path = os.fspath(path)
    if os.path.isdir(path):
        num_files = len(list_frame_files(path))
        if not num_files:
            raise MediaError(f"frame directory {path!r} has no png/jpeg/jpg file")
        return frame_dir_indices(num_files, max_frames=max_frames, max_fps=max_fps)
    if not os.path.isfile(path):
        raise MediaError(f"video {path!r} does not exist")
    try:
        num_frames, fps = _probe(path)
    except av.FFmpegError as e:
        raise MediaError(f"cannot decode video {path!r}: {e}") from e
    return video_frame_indices(num_frames, fps, max_frames=max_frames, max_fps=max_fps)


def iter_video_frames(
    path: str | os.PathLike, indices: Sequence[int], *, batch_size: int = 16
) -> Iterator[Image.Image]:
    """The frames at indices of a video file or a frame directory, decoded lazily in one pass.

    Yields the frames `decode_video_frames` returns (or the directory's files), in ascending
    index order, once per occurrence, decoding only as the consumer pulls: far-apart frames
    `batch_size` at a time by seeking (one frame table for the whole pass), otherwise one
    sequential decoder that runs through the file once. A consumer taking frames in batches
    holds only its batch. Stops early where the stream ends before an index. Raises MediaError
    naming the path when the file cannot be decoded.
    """
    path = os.fspath(path)
    order = sorted(indices)
    if os.path.isdir(path):
        files = list_frame_files(path)
        yield from (load_image(files[i]) for i in order)
        return
    try:
        decoded = _iter_wanted_frames(path, sorted(set(order)), batch_size)
        current = None  # (index, image) last decoded
        for index in order:
            while current is None or current[0] < index:
                current = next(decoded, None)
                if current is None:
                    return
            yield current[1]
    except av.FFmpegError as e:
        raise MediaError(f"cannot decode video {path!r}: {e}") from e


def _iter_wanted_frames(
    path: str, wanted: list[int], batch_size: int, *, allow_seek: bool = True
) -> Iterator[tuple[int, Image.Image]]:
    """(index, frame) for the wanted frames (ascending, distinct): `_decode_seeking` batch by
    batch when allowed and worth it, then (or else) sequentially from the start for the ones
    not yet given. A frame past the end of the stream is not given."""
    done = -1  # the last index given
    seek = allow_seek and bool(wanted) and _worth_seeking(wanted)
    table = _scan_frame_table(path) if seek else None
    if seek and table is None:
        logger.debug("%s: packets without distinct pts; decoding sequentially", path)
    if table is not None:
        reachable = [i for i in wanted if i < len(table.pts)]
        try:
            for start in range(0, len(reachable), batch_size):
                batch = reachable[start : start + batch_size]
                images, num_seeks = _decode_seeking(path, batch, table)
                logger.debug("%s: %d frames in %d seeks", path, len(batch), num_seeks)
                for index in batch:
                    yield index, images[index]
                    done = index
            return
        except (_SeekMismatch, av.FFmpegError) as e:
            logger.debug("%s: seeking failed (%s); decoding sequentially", path, e)
    rest = iter([i for i in wanted if i > done])
    target = next(rest, None)
    if target is None:
        return
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            if index == target:
                yield index, frame.to_image()  # RGB
                target = next(rest, None)
                if target is None:
                    return
