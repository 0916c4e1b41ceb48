"""Frame directories: a video given as a folder of png/jpeg/jpg frames.

This module owns listing a directory's frame files in order (`list_frame_files`), reading the
selected files' headers at planning (`read_frame_headers`: a file whose header cannot be read is
dropped and counted, with one warning a video) and decoding them one at a time
(`iter_frame_files`: a file that fails to decode is replaced by its neighbour and counted in a
`DecodeReport`, with one warning a pass). Files are read through `image.image_size` and
`image.load_image`, so the `max_pixels` limit applies to each.

It does not choose which files to take (`video.frame_dir_indices`, the official formula), build
the video's plan (`video.plan_video`), or handle video files (`video`).
"""

from __future__ import annotations

import logging
import os
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from longvita.errors import MediaError
from longvita.processing.image import PixelLimitError, image_size, load_image

logger = logging.getLogger(__name__)

FRAME_FILE_SUFFIXES = (".png", ".jpeg", ".jpg")
"""Frame file suffixes, matched case-insensitively; hidden files and folders are skipped."""


def _natural_key(text: str) -> tuple[tuple[object, ...], str]:
    """Sort key comparing digit runs as integers: 'frame2' < 'frame10', on the NFD form of the
    text as the official code's `natsort.natsorted` does ('Élan' sorts with 'E'). Ties ('f1',
    'f01') fall back to the text, where natsort keeps the directory listing's order, which
    differs from one file system to another."""
    parts = re.split(r"(\d+)", unicodedata.normalize("NFD", text))
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), text


def list_frame_files(directory: str | os.PathLike) -> list[Path]:
    """The png/jpeg/jpg files under directory (recursively, suffixes in any case), in natural
    order of the full path; hidden entries (names starting with '.': `.DS_Store`, macOS's
    `._frame1.jpg`, hidden folders) are skipped."""
    paths = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # prune hidden folders
        paths += [
            os.path.join(root, name)
            for name in files
            if not name.startswith(".") and name.lower().endswith(FRAME_FILE_SUFFIXES)
        ]
    return [Path(p) for p in sorted(paths, key=_natural_key)]


def read_frame_headers(
    directory: str, files: list[Path], indices: list[int], max_pixels: int
) -> tuple[list[int], tuple[int, int]]:
    """The selected indices whose file header reads (each checked against max_pixels), in
    order, and the (width, height) of the largest of those files. The others are dropped with
    one warning; MediaError when none reads, PixelLimitError for a file above max_pixels."""
    sizes: dict[int, tuple[int, int] | None] = {}
    for i in dict.fromkeys(indices):
        try:
            sizes[i] = image_size(files[i], max_pixels=max_pixels)
        except PixelLimitError:
            raise
        except MediaError as e:
            logger.debug("%s: skipping unreadable frame file: %s", directory, e)
            sizes[i] = None
    kept = [i for i in indices if sizes[i] is not None]
    num_skipped = len(indices) - len(kept)
    if not kept:
        raise MediaError(f"frame directory {directory!r}: none of its frame files is readable")
    if num_skipped:
        logger.warning(
            "frame directory %r: skipped %d unreadable frame file(s) of the %d selected",
            directory,
            num_skipped,
            len(indices),
        )
    largest = max((size for size in sizes.values() if size), key=lambda s: s[0] * s[1])
    return kept, largest


@dataclass
class DecodeReport:
    """What a decoding pass worked around, filled in as it goes (`video.iter_video_frames`)."""

    num_replaced: int = 0
    """Frame files that failed to decode and were replaced by a neighbouring frame."""


def iter_frame_files(
    directory: str, order: list[int], max_pixels: int, report: DecodeReport
) -> Iterator[Image.Image]:
    """The frame files at indices order (ascending) of a directory, decoded one at a time.

    A file that fails to decode is replaced by the previous good frame (or the next one when
    none came before) and counted in report, with one warning for the pass. Stops early when
    the directory has fewer files than planned; MediaError when no selected file decodes.
    """
    files = list_frame_files(directory)
    image, index, num_pending = None, -1, 0  # num_pending: failures before the first good frame
    try:
        for wanted in order:
            if wanted >= len(files):
                break
            if wanted != index:
                index = wanted
                loaded = _load_frame_file(files[wanted], max_pixels, report)
                image = image if loaded is None else loaded
            if image is None:
                num_pending += 1
                continue
            for _ in range(num_pending + 1):
                yield image
            num_pending = 0
        if num_pending:
            raise MediaError(f"frame directory {directory!r}: no selected frame file decodes")
    finally:
        if report.num_replaced:
            logger.warning(
                "frame directory %r: %d frame file(s) failed to decode, each replaced by its "
                "neighbouring frame",
                directory,
                report.num_replaced,
            )


def _load_frame_file(path: Path, max_pixels: int, report: DecodeReport) -> Image.Image | None:
    """The frame file as RGB, or None (counted in report) when it fails to decode."""
    try:
        return load_image(path, max_pixels=max_pixels)
    except PixelLimitError:
        raise
    except MediaError as e:
        logger.debug("replacing an unreadable frame: %s", e)
        report.num_replaced += 1
        return None
