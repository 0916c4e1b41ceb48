"""Video frames: which frames to take from a video file or a frame directory, and decoding them.

This module owns frame selection (the official Long-VITA formulas, reproduced exactly) and
turning a video file (PyAV) or a directory of jpg/png frames into RGB PIL images. It does not
tile or normalise frames (`longvita.processing.image.to_pixel_values` does) and knows nothing
about tokens.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from pathlib import Path

import av
from PIL import Image

from longvita.errors import MediaError
from longvita.processing.image import load_image

logger = logging.getLogger(__name__)

DEFAULT_MAX_FRAMES = 4096
DEFAULT_MAX_FPS = 1.0
FRAME_FILE_SUFFIXES = ("png", "jpeg", "jpg")


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


def _decode_selected(path: str, indices: list[int]) -> list[Image.Image]:
    """Decode sequentially, keeping the frames at indices (repeats allowed); stop after the last."""
    wanted = Counter(indices)
    last = max(indices)
    frames: list[Image.Image] = []
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                image = frame.to_image()  # RGB
                frames.extend([image] * wanted[index])
            if index >= last:
                break
    return frames


def _load_video_file(path: str, max_frames: int, max_fps: float) -> list[Image.Image]:
    try:
        num_frames, fps = _probe(path)
        indices = video_frame_indices(num_frames, fps, max_frames=max_frames, max_fps=max_fps)
        frames = _decode_selected(path, indices)
    except av.FFmpegError as e:
        raise MediaError(f"cannot decode video {path!r}: {e}") from e
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
