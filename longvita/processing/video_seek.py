"""Frame-accurate seeking in a video file: reaching far-apart frames without decoding the rest.

This module owns the frame table of a video stream (where each frame's packet is and which are
keyframes, from one demux pass: `scan_frame_table`) and the seeking decoder (`seek_frames`:
jump to the keyframe before each far-away frame and decode forward from it, checking every
decoded frame against the table). It gives the same frames as decoding the file from the start,
or raises SeekMismatch so that the caller can decode sequentially instead.

It does not choose the frames (`video.plan_video`), open or configure the decoder (the caller
hands it an opened container and stream: `video.open_video` checks `max_pixels` and sets the
threads), convert frames to images, or decide when seeking is allowed (`video.iter_video_frames`).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass

import av

logger = logging.getLogger(__name__)

# Seek only when it skips decoding more than this many frames; nearer frames are decoded through
# (a seek flushes the decoder and its threads, which costs about as much as a few frames).
SEEK_MIN_SKIP = 16


class SeekMismatch(Exception):
    """The seeking decoder did not see the frame the frame table predicted."""


@dataclass(frozen=True)
class FrameTable:
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


def scan_frame_table(path: str) -> FrameTable | None:
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
    return FrameTable(pts=pts, keyframes=keyframes, keyframe_at_pts={pts[k]: k for k in keyframes})


def _frames_from_here(
    container: av.container.InputContainer, stream: av.VideoStream, table: FrameTable
) -> Iterator[tuple[int, av.VideoFrame]]:
    """(frame index, frame) for the frames decoded from the container's current position.

    Frames before the first keyframe are dropped (after a seek, pictures that need frames before
    it); from that keyframe on, every frame must be the next one in the table, else SeekMismatch.
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
                    raise SeekMismatch(f"frame {index}: decoded pts {frame.pts} is not the table's")
            yield index, frame


def _decode_up_to(frames: Iterator[tuple[int, av.VideoFrame]], target: int) -> av.VideoFrame:
    for index, frame in frames:
        if index >= target:
            if index != target:
                raise SeekMismatch(f"frame {target} wanted, decoding started at frame {index}")
            return frame
    raise SeekMismatch(f"the stream ended before frame {target}")


def seek_frames(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    wanted: Sequence[int],
    table: FrameTable,
) -> Generator[tuple[int, av.VideoFrame], None, int]:
    """(index, frame) for wanted (ascending, distinct, all < len(table.pts)), one at a time,
    decoded from stream of the opened container (at its start); returns the number of seeks.

    For each wanted frame whose keyframe lies more than SEEK_MIN_SKIP frames past the last frame
    decoded, seek to that keyframe's pts (the demuxer lands on it or an earlier keyframe) and
    decode forward; otherwise keep decoding. Raises SeekMismatch when a decoded frame is not the
    one the table predicts, so that the caller can decode sequentially instead. Every frame
    decoded is checked against the table; frames skipped by a seek are not decoded, so the
    one-frame-per-packet premise of the table is taken on trust there (a well-formed stream).
    """
    num_seeks, position = 0, -1  # position: index of the last frame decoded
    frames = None
    for target in wanted:
        keyframe = table.keyframe_before(target)
        if keyframe is not None and keyframe > position + SEEK_MIN_SKIP:
            if frames is not None:
                frames.close()
            container.seek(table.pts[keyframe], stream=stream, backward=True, any_frame=False)
            frames, num_seeks = None, num_seeks + 1
        if frames is None:
            frames = _frames_from_here(container, stream, table)
        yield target, _decode_up_to(frames, target)
        position = target
    logger.debug("%s: %d frames in %d seeks", container.name, len(wanted), num_seeks)
    return num_seeks


def worth_seeking(wanted: Sequence[int]) -> bool:
    """Whether some wanted frame is more than SEEK_MIN_SKIP frames past the previous one."""
    return any(b - a > SEEK_MIN_SKIP for a, b in zip([-1, *wanted[:-1]], wanted, strict=True))
