"""Videos given as frame directories (processing.frame_dirs, processing.video, processing.tiles):
suffixes in any case, hidden entries skipped, unreadable frame files dropped at planning or
replaced at decoding, counted and reported once per video."""

import logging
import re

import pytest
import torch
from PIL import Image

from longvita.errors import MediaError
from longvita.processing.image import PixelLimitError, to_pixel_values
from longvita.processing.tiles import TileSource, VideoFrameTiles
from longvita.processing.video import iter_video_frames, list_frame_files, plan_video

TILE = 28


def _frames(directory, num_frames, size=(16, 12)):
    """Frame k: a solid grey of level 20 * k + 10, named frame{k}.png."""
    directory.mkdir(exist_ok=True)
    paths = []
    for k in range(num_frames):
        paths.append(directory / f"frame{k}.png")
        Image.new("RGB", size, (20 * k + 10,) * 3).save(paths[-1])
    return paths


def _truncate(path):
    """Keep the PNG header (the size still reads) and cut the pixel data."""
    path.write_bytes(path.read_bytes()[:45])


def _levels(pixels):
    """The grey level of each tile, from its centre pixel."""
    greys = [Image.new("RGB", (1, 1), (level,) * 3) for level in range(256)]
    grey = to_pixel_values(greys, tile_size=1)
    table = grey[:, 0, 0, 0]  # [256]
    return [int((table - tile[0, TILE // 2, TILE // 2]).abs().argmin()) for tile in pixels]


def _segment(directory, **kwargs):
    plan = plan_video(directory, **kwargs)
    return VideoFrameTiles.from_plan(directory, plan, tile_size=TILE, max_pixels=10**6)


def test_frame_files_in_any_case_and_no_hidden_entries(tmp_path):
    names = ["a1.JPG", "a2.Png", "a3.jpeg", "a10.jpg", ".DS_Store", "._a1.jpg", "notes.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    for folder, name in [(".hidden", "a0.jpg"), ("sub", "a4.JPEG"), ("sub/.cache", "a5.png")]:
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / name).write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in list_frame_files(tmp_path)]
    assert found == ["a1.JPG", "a2.Png", "a3.jpeg", "a10.jpg", "sub/a4.JPEG"]


def test_frame_files_in_natural_order_recursively(tmp_path):
    for name in ["frame10.jpg", "frame2.jpg", "frame1.png", "notes.txt", "frame3.JPG"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "frame0.jpeg").write_bytes(b"")
    names = [p.relative_to(tmp_path).as_posix() for p in list_frame_files(tmp_path)]
    # suffixes match in any case (the official code's match is case-sensitive and skips .JPG)
    assert names == ["frame1.png", "frame2.jpg", "frame3.JPG", "frame10.jpg", "sub/frame0.jpeg"]


def test_accented_names_sort_as_natsort_does(tmp_path):
    """natsort (the official code's) compares the NFD form: 'É' sorts with 'E', before 'Z'."""
    for folder in ["Zeta", "Élan", "Eagle"]:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "f1.jpg").write_bytes(b"")
    names = [p.parent.name for p in list_frame_files(tmp_path)]
    assert names == ["Eagle", "Élan", "Zeta"]


def test_planned_frames_from_directory(tmp_path):
    _frames(tmp_path / "clip", 10)
    indices = plan_video(tmp_path / "clip", max_frames=4).indices
    assert indices == [0, 2, 4, 6]  # target 4, stride int(10 / 4) = 2
    frames = list(iter_video_frames(tmp_path / "clip", indices))
    assert [f.mode for f in frames] == ["RGB"] * 4
    assert [f.getpixel((0, 0))[0] for f in frames] == [10, 50, 90, 130]


def test_directory_without_frame_files(tmp_path):
    (tmp_path / "readme.txt").write_text("no frames here")
    with pytest.raises(MediaError, match=re.escape(str(tmp_path))):
        plan_video(tmp_path)


def test_unreadable_headers_are_dropped_at_planning(tmp_path, caplog):
    paths = _frames(tmp_path / "clip", 6)
    paths[1].write_text("not an image")
    paths[3].write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        segment = _segment(tmp_path / "clip", max_frames=8)
    assert segment.frame_indices == [0, 2, 4, 5] and segment.num_skipped_frames == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "clip" in warnings[0] and "skipped 2 " in warnings[0]
    assert _levels(TileSource([segment], tile_size=TILE).get_all()) == [10, 50, 90, 110]


@pytest.mark.parametrize(("broken", "expected"), [(2, [10, 30, 30, 70]), (0, [30, 30, 50, 70])])
def test_frame_failing_to_decode_is_replaced_by_a_neighbour(tmp_path, caplog, broken, expected):
    paths = _frames(tmp_path / "clip", 4)
    _truncate(paths[broken])
    segment = _segment(tmp_path / "clip")
    assert segment.frame_indices == [0, 1, 2, 3] and segment.num_skipped_frames == 0
    with caplog.at_level(logging.WARNING):
        pixels = TileSource([segment], tile_size=TILE).get_all()
    assert _levels(pixels) == expected  # the previous frame, or the next for the first
    assert segment.num_replaced_frames == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "clip" in warnings[0] and " 1 frame file" in warnings[0]


def test_directory_without_a_readable_frame(tmp_path):
    paths = _frames(tmp_path / "headers", 3)
    for path in paths:
        path.write_text("garbage")
    with pytest.raises(MediaError, match="none of its frame files is readable"):
        plan_video(tmp_path / "headers")
    paths = _frames(tmp_path / "pixels", 3)
    for path in paths:
        _truncate(path)
    segment = _segment(tmp_path / "pixels")
    with pytest.raises(MediaError, match="no selected frame file decodes"):
        segment.load([0])
    with pytest.raises(MediaError, match="no selected frame file decodes"):
        list(iter_video_frames(tmp_path / "pixels", plan_video(tmp_path / "pixels").indices))


def test_frame_file_above_max_pixels_refuses_the_video(tmp_path):
    paths = _frames(tmp_path / "clip", 3)
    Image.new("RGB", (100, 100)).save(paths[1])
    with pytest.raises(PixelLimitError, match=r"frame1\.png' is 100x100"):
        plan_video(tmp_path / "clip", max_pixels=9999)


def test_directory_tiles_equal_the_eager_frames(tmp_path):
    _frames(tmp_path / "clip", 5, size=(30, 20))
    segment = _segment(tmp_path / "clip", max_frames=4)  # target 4, stride int(5 / 4) = 1
    indices = plan_video(tmp_path / "clip", max_frames=4).indices
    eager = to_pixel_values(list(iter_video_frames(tmp_path / "clip", indices)), tile_size=TILE)
    assert segment.frame_indices == [0, 1, 2, 3]
    torch.testing.assert_close(segment.load([0, 1, 2, 3]), eager, rtol=0, atol=0)
    torch.testing.assert_close(segment.load([1, 1]), eager[[1, 1]], rtol=0, atol=0)
    assert segment.num_passes == 2
